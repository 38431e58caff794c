"""Write the small sentiment data set that ships with llamaforge (llamaforge/datasets/sentiment/).

Short product, restaurant, hotel, film and book reviews in English and Chinese, labelled
positive / negative, composed from phrases written for this project (no outside text). The
output is deterministic: rerunning this script reproduces the shipped files byte for byte.

    python scripts/make_sentiment_data.py
"""
from __future__ import annotations

import csv
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "llamaforge" / "datasets" / "sentiment"
SPLITS = {"train": 320, "dev": 80, "test": 80}

# topic: (subjects, positive phrases, negative phrases); every phrase fits every subject of its topic.
EN = {
    "food": (["The pasta", "The soup", "The curry", "Our meal", "The dessert", "The pizza"],
             ["was delicious", "tasted fresh and full of flavour", "was cooked perfectly", "was worth every penny"],
             ["was cold and bland", "tasted stale", "was far too salty", "was a waste of money"]),
    "service": (["The waiter", "The hotel staff", "The receptionist", "The manager", "Customer support"],
                ["was friendly and helpful", "went out of their way for us", "was quick and polite", "was wonderful"],
                ["was rude and unhelpful", "ignored us for half an hour", "was slow and careless", "was awful"]),
    "room": (["The room", "The bathroom", "Our suite", "The bedroom"],
             ["was spotless", "was quiet and cosy", "was bright and spacious", "exceeded my expectations"],
             ["was dirty", "was noisy all night", "smelled of smoke", "was cramped and dark"]),
    "device": (["This phone", "The laptop", "The headset", "The camera", "The speaker", "The tablet"],
               ["works perfectly", "is fast and reliable", "is great value", "is a pleasure to use"],
               ["stopped working after a week", "is slow and crashes", "is overpriced junk", "broke on the first day"]),
    "film": (["The movie", "This film", "The acting", "The plot", "The ending", "The soundtrack"],
             ["was brilliant", "was moving and funny", "was clever and original", "was a joy from start to finish"],
             ["was boring", "made no sense", "was predictable and lazy", "was painful to sit through"]),
    "book": (["This book", "The story", "The author's writing", "The main character", "The translation"],
             ["was a delight to read", "was gripping", "felt warm and alive", "was beautifully done"],
             ["was tedious", "dragged on forever", "felt flat and lifeless", "was clumsy and dull"]),
}
EN_CLOSE = {"positive": ["Highly recommended.", "Would buy again.", "I loved it.", "Five stars.", "Great experience."],
            "negative": ["Avoid it.", "Never again.", "I want a refund.", "One star.", "Very disappointing."]}

ZH = {
    "food": (["这家店的菜", "汤", "牛肉面", "甜点", "晚餐", "烤鸭"],
             ["非常好吃", "新鲜又入味", "分量足，价格实惠", "让人回味无穷"],
             ["又冷又难吃", "一点也不新鲜", "太咸了", "贵得离谱"]),
    "service": (["服务员", "前台", "客服", "店员", "经理"],
                ["热情周到", "耐心又专业", "服务很好", "帮了我们很多忙"],
                ["态度很差", "爱答不理", "敷衍了事", "让人很生气"]),
    "room": (["房间", "卫生间", "床", "酒店的环境"],
             ["干净整洁", "很舒服", "宽敞明亮", "安静舒适"],
             ["又脏又乱", "有一股霉味", "又小又暗", "吵得睡不着"]),
    "device": (["这部手机", "这台电脑", "耳机", "相机", "平板"],
               ["运行流畅", "性价比很高", "做工精致", "用起来很顺手"],
               ["用了一周就坏了", "卡顿严重", "质量太差", "发烫严重"]),
    "film": (["这部电影", "演员的表演", "剧情", "结局", "配乐"],
             ["非常精彩", "感人至深", "紧凑有趣", "令人难忘"],
             ["无聊透顶", "尴尬做作", "拖沓混乱", "让人失望"]),
    "book": (["这本书", "故事", "作者的文笔", "书中的人物", "翻译"],
             ["值得一读", "引人入胜", "优美流畅", "生动有趣"],
             ["枯燥乏味", "老套无聊", "生硬啰嗦", "单薄空洞"]),
}
ZH_CLOSE = {"positive": ["强烈推荐！", "非常满意。", "五星好评。", "物超所值。", "下次还会选择。"],
            "negative": ["不推荐。", "再也不会买了。", "非常失望。", "差评。", "要求退款。"]}


def review(rng: random.Random, lang: str, label: str) -> str:
    domains, close = (EN, EN_CLOSE) if lang == "en" else (ZH, ZH_CLOSE)
    subjects, pos, neg = domains[rng.choice(sorted(domains))]
    phrases = pos if label == "positive" else neg
    s1, s2 = rng.sample(subjects, 2)
    p1, p2 = rng.sample(phrases, 2)
    if lang == "en":
        parts = [f"{s1} {p1}."]
        if rng.random() < 0.6:
            parts.append(f"{s2} {p2} too." if rng.random() < 0.5 else f"{s2} {p2}.")
    else:
        parts = [f"{s1}{p1}，" + (f"{s2}也{p2}。" if rng.random() < 0.6 else "")]
        parts[0] = parts[0].rstrip("，") + ("。" if parts[0].endswith("，") else "")
    if rng.random() < 0.7:
        parts.append(rng.choice(close[label]))
    return (" " if lang == "en" else "").join(parts)


def main():
    rng = random.Random(20261123)
    seen, rows = set(), {name: [] for name in SPLITS}
    for name, n in SPLITS.items():
        while len(rows[name]) < n:
            i = len(rows[name])
            lang, label = ("en", "zh")[i % 2], ("positive", "negative")[(i // 2) % 2]
            text = review(rng, lang, label)
            if text not in seen:   # no text appears twice, in one split or across splits
                seen.add(text)
                rows[name].append((text, label))
        rng.shuffle(rows[name])
    OUT.mkdir(parents=True, exist_ok=True)
    for name, data in rows.items():
        with open(OUT / f"{name}.csv", "w", encoding="utf-8", newline="") as f:
            w = csv.writer(f, lineterminator="\n")
            w.writerow(["text", "label"])
            w.writerows(data)
        print(f"{OUT / name}.csv: {len(data)} rows")


if __name__ == "__main__":
    main()
