"""Data readers: every format with line numbers, and every bad-input case with a message that
names the file and the line."""
import json

import pytest
import torch

from llamaforge.data.batching import length_bucketed_batches, pad_right
from llamaforge.data.labelled import encode_texts, label_ids, label_names, read_labelled
from llamaforge.data.records import read_records
from llamaforge.errors import LlamaforgeError


def write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return p


@pytest.mark.parametrize("name,text", [
    ("d.csv", 'text,label\n"good, really",pos\n\nbad,neg\n'),
    ("d.tsv", 'text\tlabel\n"good, really\tpos\n\nbad\tneg\n'),
    ("d.jsonl", '{"text": "good, really", "label": "pos"}\n\n{"text": "bad", "label": "neg"}\n'),
    ("d.json", '[\n  {"text": "good, really", "label": "pos"},\n\n  {"text": "bad", "label": "neg"}\n]\n'),
])
def test_formats_read_with_line_numbers(tmp_path, name, text):
    recs = read_labelled(write(tmp_path, name, text))
    assert [r.label for r in recs] == ["pos", "neg"]
    assert recs[0].text == ('"good, really' if name.endswith(".tsv") else "good, really")  # TSV is unquoted
    assert recs[1].source.endswith(f"{name}:{3 if name.endswith('.jsonl') else 4}")


@pytest.mark.parametrize("name,text", [
    ("d.csv", 'text,label\n"one\u2028two",pos\nthree\u0085four\x0cfive,neg\r\nsix\u2029,pos\n'),
    ("d.tsv", 'text\tlabel\none\u2028two\tpos\nthree\u0085four\x0cfive\tneg\r\nsix\u2029\tpos\n'),
    ("d.jsonl", "\r\n".join(json.dumps({"text": t, "label": lab}, ensure_ascii=False)   # \u2028 raw, \x0c as \\f
                             for t, lab in [("one\u2028two", "pos"), ("three\u0085four\x0cfive", "neg"), ("six\u2029", "pos")])),
])
def test_lines_end_at_newlines_only(tmp_path, name, text):
    """U+2028, U+2029, U+0085 and form feeds are text inside a field, as the csv and json modules
    read them (str.splitlines would break the record there)."""
    recs = read_labelled(write(tmp_path, name, text))
    assert [r.text for r in recs] == ["one\u2028two", "three\u0085four\x0cfive", "six\u2029"]
    assert [r.source.rsplit(":", 1)[1] for r in recs] == (["1", "2", "3"] if name.endswith(".jsonl") else ["2", "3", "4"])


def test_an_unterminated_quote_is_reported_where_it_starts(tmp_path):
    p = write(tmp_path, "d.csv", 'text,label\nok,pos\n"never closed,neg\nthird,pos\nfourth,neg\n')
    with pytest.raises(LlamaforgeError, match=r"d\.csv:3: .*quote opened on this line is never closed"):
        read_labelled(p)
    recs = read_labelled(write(tmp_path, "m.csv", 'text,label\n"two\nlines",pos\nnext,neg\n'))
    assert [(r.text, r.source.rsplit(":", 1)[1]) for r in recs] == [("two\nlines", "2"), ("next", "4")]


def test_numeric_labels_keep_their_order(tmp_path):
    recs = read_labelled(write(tmp_path, "d.jsonl", "".join(json.dumps({"text": f"t{i}", "label": l}) + "\n"
                                                            for i, l in enumerate([10, 2, 1, 2]))))
    assert label_names(recs) == ["1", "2", "10"]
    assert label_ids(recs, label_names(recs)) == [2, 1, 0, 1]


@pytest.mark.parametrize("name,text,message", [
    ("d.csv", "sentence,label\nok,pos\n", r"d\.csv:1: no column 'text' \(found: sentence, label\); name it with --text-column"),
    ("d.csv", "text,label\nok,pos\n ,neg\n", r"d\.csv:3: empty or missing 'text'"),
    ("d.csv", "text,label\nok,pos\nok,neg,extra\n", r"d\.csv:3: expected 2 fields"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b", "label": }\n', r"d\.jsonl:2: invalid JSON"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n["b", "y"]\n', r"d\.jsonl:2: expected a JSON object"),
    ("d.jsonl", '{"text": "a", "label": "x"}\n{"text": "b"}\n', r"d\.jsonl:2: empty or missing 'label'"),
    ("d.json", '[{"text": "a", "label": "x"},\n {"text": "b" "label": "y"}]', r"d\.json:2: invalid JSON"),
    ("d.json", '{"text": "a"}', r"d\.json:1: expected a JSON array"),
    ("d.csv", "", r"d\.csv: empty file"),
    ("d.csv", "  \n\n", r"d\.csv: empty file"),
    ("d.txt", "text\n", r"d\.txt: unknown data format"),
])
def test_bad_input_names_file_and_line(tmp_path, name, text, message):
    with pytest.raises(LlamaforgeError, match=message):
        read_labelled(write(tmp_path, name, text))


def test_missing_pair_column_names_its_flag(tmp_path):
    with pytest.raises(LlamaforgeError, match=r"no column 'answer' .*--text-pair-column"):
        read_labelled(write(tmp_path, "d.csv", "text,label\nok,pos\n"), text_pair_column="answer")


def test_not_utf8_names_the_line(tmp_path):
    p = write(tmp_path, "gbk.csv", "text,label\nok,pos\n很好,pos\n", encoding="gbk")
    with pytest.raises(LlamaforgeError, match=r"gbk\.csv:3: not UTF-8"):
        read_records(p)


def test_missing_file(tmp_path):
    with pytest.raises(LlamaforgeError, match="nope.csv: no such file"):
        read_records(tmp_path / "nope.csv")


def test_unseen_label_in_dev(tmp_path):
    train = read_labelled(write(tmp_path, "train.csv", "text,label\na,pos\nb,neg\n"))
    dev = read_labelled(write(tmp_path, "dev.csv", "text,label\na,pos\nb,neutral\n"))
    with pytest.raises(LlamaforgeError, match=r"dev\.csv:3: label 'neutral' never seen in the training data \(known: neg, pos\)"):
        label_ids(dev, label_names(train))


def test_truncation_is_counted_and_reported(tmp_path, tiny_bpe, capsys):
    recs = read_labelled(write(tmp_path, "d.csv", "text,label\n" + "the llama model runs fast " * 20 + ",pos\nshort,neg\n"))
    seqs = encode_texts(tiny_bpe, recs, max_length=16, name="d.csv")
    assert len(seqs[0]) == 16 and len(seqs[1]) < 16
    assert "d.csv: 1 of 2 texts longer than 16 tokens were truncated" in capsys.readouterr().err


def test_pairs_are_joined_and_truncated_longest_first(tmp_path, tiny_bpe):
    recs = read_labelled(write(tmp_path, "d.csv", "q,a,label\nshort," + "llama " * 40 + ",yes\n"),
                         text_column="q", text_pair_column="a")
    seq = encode_texts(tiny_bpe, recs, max_length=12, report=False)[0]
    first = tiny_bpe.encode("short")
    assert len(seq) == 12 and seq[:len(first)] == first and seq[len(first)] == tiny_bpe.eos_id


def test_left_truncation_keeps_the_end_of_texts_and_pairs(tmp_path, tiny_bpe):
    long = "the llama model runs fast and far " * 10 + "the end"
    recs = read_labelled(write(tmp_path, "d.csv", f"text,label\n{long},pos\nshort,neg\n"))
    whole = tiny_bpe.encode(long)
    left = encode_texts(tiny_bpe, recs, max_length=16, report=False, truncation_side="left")
    right = encode_texts(tiny_bpe, recs, max_length=16, report=False)
    assert left[0] == whole[-16:] and right[0] == whole[:16]
    assert left[1] == right[1] == tiny_bpe.encode("short")   # short texts are untouched
    pairs = read_labelled(write(tmp_path, "p.csv", f"q,a,label\nshort,{long},yes\n"),
                          text_column="q", text_pair_column="a")
    seq = encode_texts(tiny_bpe, pairs, max_length=12, report=False, truncation_side="left")[0]
    first = tiny_bpe.encode("short")
    assert len(seq) == 12 and seq[:len(first) + 1] == first + [tiny_bpe.eos_id]
    assert seq[len(first) + 1:] == whole[-(12 - len(first) - 1):]
    with pytest.raises(LlamaforgeError, match="truncation-side must be right or left"):
        encode_texts(tiny_bpe, recs, max_length=16, truncation_side="middle")


def test_left_truncation_keeps_a_leading_bos(tmp_path, spm_model):
    from llamaforge.text.convert import from_sentencepiece_model
    tok = from_sentencepiece_model(spm_model)   # Llama's SentencePiece: adds BOS
    long = "the llama model runs fast and far " * 10 + "the end"
    recs = read_labelled(write(tmp_path, "d.csv", f"text,label\n{long},pos\n"))
    whole = tok.encode(long)
    assert whole[0] == tok.bos_id
    seq = encode_texts(tok, recs, max_length=16, report=False, truncation_side="left")[0]
    assert seq == [tok.bos_id] + whole[-15:]


def test_length_buckets_cover_everything_once_and_group_lengths():
    lengths = [int(x) for x in torch.randint(1, 100, (1000,), generator=torch.Generator().manual_seed(0))]
    batches = length_bucketed_batches(lengths, 16, torch.Generator().manual_seed(1))
    assert sorted(i for b in batches for i in b) == list(range(1000))
    # Padding waste: well under random batching's.
    real = sum(lengths)
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    assert real / padded > 0.9
    again = length_bucketed_batches(lengths, 16, torch.Generator().manual_seed(1))
    assert again == batches   # same seed, same order: what resume relies on
    eval_batches = length_bucketed_batches(lengths, 16)
    assert sorted(i for b in eval_batches for i in b) == list(range(1000))


def test_pad_right():
    ids, lengths = pad_right([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [8, 0, 0]] and lengths.tolist() == [3, 1]
