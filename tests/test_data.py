"""Reading user data files (fedlora_fast.data): malformed rows, encodings, label readings, the split's
guarantees, and hub-name routing. Every error must name the file (and the line where there is one)."""

from __future__ import annotations

import sys
import warnings

import pytest

from fedlora_fast import data as D
from fedlora_fast.data import DataError, load_text_classification


def _write(tmp_path, name, text, encoding="utf-8"):
    p = tmp_path / name
    p.write_bytes(text.encode(encoding))
    return str(p)


# --- malformed rows -----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "body, line, found",
    [
        ("hello, world,ham\nok,spam\n" + "x,ham\n" * 4, 2, 3),  # first row has an extra field
        ("ok,ham\nfree,spam\nbuy now, cheap,spam\nfine,ham\n", 4, 3),  # a later row: text was silently cut
        ("ok,ham\nbuy now\nfree,spam\n", 3, 1),  # a missing field
    ],
    ids=["extra_first", "extra_later", "missing"],
)
def test_csv_row_with_wrong_field_count_is_refused(tmp_path, body, line, found):
    p = _write(tmp_path, "d.csv", "text,label\n" + body)
    with pytest.raises(DataError) as e:
        load_text_classification(p, seed=0)
    msg = str(e.value)
    assert p in msg and f"line {line}" in msg and f"{found} field(s), expected 2" in msg, msg
    assert "quoted" in msg, msg


def test_tsv_row_with_a_tab_in_the_text_is_refused(tmp_path):
    p = _write(tmp_path, "d.tsv", "Label\tSMS\nham\tok\nspam\tfree\tnow\n")
    with pytest.raises(DataError, match=r"line 3: 3 field\(s\), expected 2.*TSV is read without quoting"):
        load_text_classification(p, seed=0)


def test_csv_quoting_works_and_tsv_quotes_are_text(tmp_path):
    rows = "".join(f'"msg {i}, with a comma",{"spam" if i % 2 else "ham"}\n' for i in range(10))
    tr, te = load_text_classification(_write(tmp_path, "q.csv", "text,label\n" + rows), seed=0)
    assert {t for d in (tr, te) for t in d.texts} == {f"msg {i}, with a comma" for i in range(10)}
    rows = "".join(f'{"spam" if i % 2 else "ham"}\tsaid "hi {i}\n' for i in range(10))
    tr, te = load_text_classification(_write(tmp_path, "q.tsv", "Label\tSMS\n" + rows), seed=0)
    assert {t for d in (tr, te) for t in d.texts} == {f'said "hi {i}' for i in range(10)}


def test_blank_and_whitespace_lines_are_skipped(tmp_path):
    p = _write(tmp_path, "d.csv", "text,label\nok,ham\n\n   \nfree,spam\nfine,ham\nwin,spam\n\n")
    tr, te = load_text_classification(p, seed=0, test_fraction=0.5)
    assert sorted(tr.texts + te.texts) == ["fine", "free", "ok", "win"]


# --- errors name the file and line --------------------------------------------------------------------------
def test_non_utf8_file_is_refused_with_file_line_and_advice(tmp_path):
    p = _write(tmp_path, "latin1.csv", "text,label\nok,ham\ncaf\u00e9,spam\n", encoding="latin-1")
    with pytest.raises(DataError) as e:
        load_text_classification(p, seed=0)
    msg = str(e.value)
    assert p in msg and "not UTF-8" in msg and "line 3" in msg and "re-save" in msg and "UTF-8" in msg, msg
    pj = _write(tmp_path, "latin1.jsonl", '{"text": "caf\u00e9", "label": 0}\n', encoding="latin-1")
    with pytest.raises(DataError, match="not UTF-8 text.*line 1"):
        load_text_classification(pj, seed=0)


def test_label_and_column_errors_name_the_file_and_line(tmp_path):
    one = _write(tmp_path, "one.csv", "text,label\na,ham\nb,ham\n")
    with pytest.raises(DataError, match=r"at least 2 classes.*" + "one.csv"):
        load_text_classification(one, seed=0)
    cols = _write(tmp_path, "cols.csv", "text,label\na,ham\nb,spam\n")
    with pytest.raises(DataError, match=r"no column 'foo' in .*cols\.csv"):
        load_text_classification(cols, text_column="foo", seed=0)
    nolab = _write(tmp_path, "nolab.csv", "text,label\na,ham\nb,\nc,spam\n")
    with pytest.raises(DataError, match=r"1 example\(s\) in .*nolab\.csv have no label \(first at line 3\)"):
        load_text_classification(nolab, seed=0)
    with pytest.raises(DataError, match=r"nolab\.csv have no label \(first at line 3\)"):
        load_text_classification(nolab, seed=0, label_names=["ham", "spam"])
    js = _write(tmp_path, "d.jsonl", '{"text": "a", "label": "ham"}\n\n{"text": "b", "label": null}\n')
    with pytest.raises(DataError, match=r"d\.jsonl have no label \(first at line 3\)"):
        load_text_classification(js, seed=0)


# --- labels with fixed classes: one reading per file --------------------------------------------------------
def test_integer_class_names_and_ids_are_not_mixed(tmp_path):
    """Classes "1", "2" (star ratings): a stray 0 used to switch the whole file to class ids, shifting
    every label by one."""
    rows = "".join(f"review {i},{1 + i % 2}\n" for i in range(10)) + "review x,0\n"
    p = _write(tmp_path, "stars.csv", "text,label\n" + rows)
    with pytest.raises(DataError) as e:
        load_text_classification(p, seed=0, label_names=["1", "2"])
    msg = str(e.value)
    assert "mixes class names and class ids" in msg and "'0' (line 12)" in msg and p in msg, msg
    # all names: read as names, never shifted
    p2 = _write(tmp_path, "stars2.csv", "text,label\n" + "".join(f"review {i},{1 + i % 2}\n" for i in range(10)))
    tr, te = load_text_classification(p2, seed=0, label_names=["1", "2"])
    got = {t: tr.label_names[y] for d in (tr, te) for t, y in zip(d.texts, d.labels)}
    assert got == {f"review {i}": str(1 + i % 2) for i in range(10)}


def test_numeric_class_names_written_otherwise_are_read_as_the_labels_are(tmp_path):
    """Classes given as "1.0"/"0.0" or "01"/"00", out of numeric order: the file's labels were read as "1"/"0"
    but the names were not, so every label was read as a class id and the classes swapped, silently."""
    for given, label in ((["1.0", "0.0"], {1: "1.0", 0: "0.0"}), (["01", "00"], {1: "01", 0: "00"})):
        rows = "".join(f"great movie {i},{label[1]}\nawful movie {i},{label[0]}\n" for i in range(6))
        p = _write(tmp_path, f"d{given[0]}.csv", "text,label\n" + rows)
        tr, te = load_text_classification(p, seed=0, label_names=given)
        got = {t.split()[0]: tr.label_names[y] for d in (tr, te) for t, y in zip(d.texts, d.labels)}
        assert got == {"great": given[0], "awful": given[1]}, (given, got)
    with pytest.raises(DataError, match=r"label_names: expected distinct classes, got '1' and '1\.0'"):
        load_text_classification(p, seed=0, label_names=["1", "1.0"])


def test_class_label_ids_outside_the_classes_are_refused():
    """A ClassLabel column whose names are the classes given: its ids were taken unchecked, and the datasets
    library's -1 ("no label") was filed under the last class by the split (or failed far from the file)."""
    from fedlora_fast.data import _to_data

    rows = [{"text": "great film", "label": 1}, {"text": "awful film", "label": -1}, {"text": "fine", "label": 2}]
    names, where = {"label": ["negative", "positive"]}, ["row 1", "row 2", "row 3"]
    with pytest.raises(DataError, match=r"ds\[test\] has class ids \[-1, 2\] outside \[0, 2\).*first at row 2"):
        _to_data(rows, names, where, None, None, "ds[test]", ["negative", "positive"])
    ok = _to_data(rows[:1], names, where, None, None, "ds[test]", ["negative", "positive"])
    assert ok.labels == [1]


def test_unknown_label_with_fixed_classes_names_the_line(tmp_path):
    p = _write(tmp_path, "d.csv", "text,label\na,ham\nb,eggs\n")
    with pytest.raises(DataError, match=r"labels \['eggs'\] outside the classes \['ham', 'spam'\] \(first at line 3\)"):
        load_text_classification(p, seed=0, label_names=["ham", "spam"])


# --- the split ----------------------------------------------------------------------------------------------
def _spam_group(n_spam_texts: int, copies: int) -> D.TextClassificationData:
    texts = [f"ham {i}" for i in range(40)] + [f"spam {i % n_spam_texts}" for i in range(copies)]
    return D.TextClassificationData(texts, [0] * 40 + [1] * copies, ["ham", "spam"], "mem")


@pytest.mark.parametrize("seed", range(5))
def test_split_never_moves_a_whole_class_into_test(seed):
    """40 distinct ham and one spam text repeated 10 times: all spam went to test, none was trained on."""
    with pytest.warns(UserWarning, match="class 'spam' in mem has a single distinct text \\(10 copies\\)"):
        tr, te = D.train_test_split(_spam_group(1, 10), 0.2, seed)
    assert tr.class_counts() == [32, 10] and te.class_counts() == [8, 0]


@pytest.mark.parametrize("seed", range(5))
def test_split_keeps_a_class_with_two_texts_on_both_sides(seed):
    """Two spam texts, 6 copies each: want round(12 * 0.2) = 2; either group overshoots, but both sides
    must see spam, and no text is on both sides."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tr, te = D.train_test_split(_spam_group(2, 12), 0.2, seed)
    assert tr.class_counts()[1] == 6 and te.class_counts()[1] == 6
    assert not set(tr.texts) & set(te.texts)
    # a class so small that its rounded share is all of it still keeps one text in train
    data = D.TextClassificationData(["a", "b", "c", "d", "e"], [0, 0, 0, 1, 1], ["x", "y"], "mem")
    tr, te = D.train_test_split(data, 0.8, seed)
    assert tr.class_counts()[1] == 1 and te.class_counts()[1] == 1


def test_split_does_not_overshoot_on_a_big_duplicate_group():
    texts = [f"m {i}" for i in range(50)] + ["same"] * 30 + [f"s {i}" for i in range(20)]
    data = D.TextClassificationData(texts, [0] * 80 + [1] * 20, ["a", "b"], "mem")
    for seed in range(10):
        tr, te = D.train_test_split(data, 0.2, seed)
        assert te.class_counts()[0] <= 16, (seed, te.class_counts())  # want 16: the group of 30 is passed over


def test_split_warns_of_a_class_whose_texts_all_first_appear_under_another_class():
    """Spam only in texts first labelled ham ("a", "b"): the groups go with ham, so the guarantee for a class
    with 2 distinct texts never saw spam, and at some seeds the test split had none of it, without a word."""
    texts = [f"ham {i}" for i in range(20)] + ["a", "a", "b", "b"]
    data = D.TextClassificationData(texts, [0] * 20 + [0, 1, 0, 1], ["ham", "spam"], "mem")
    one_sided = 0
    for seed in range(10):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tr, te = D.train_test_split(data, 0.2, seed)
        said = [str(w.message) for w in caught]
        if te.class_counts()[1] == 0:
            one_sided += 1
            assert said == ["data: class 'spam' in mem has 2 distinct texts, 2 of them first labelled as another "
                            "class (identical texts go with their first example's class): it is in the train split "
                            "only, the test split has none of it"], (seed, said)
        else:
            assert tr.class_counts()[1] and not said, (seed, said)
    assert 0 < one_sided < 10  # (both cases seen)
    # a single text whose only copy the split puts in test: the warning said "it stays in train"
    data = D.TextClassificationData(["a", "b", "c", "d", "e", "x"], [0] * 5 + [1], ["y", "z"], "mem")
    with pytest.warns(UserWarning, match=r"class 'z' in mem has a single distinct text: it is in the test split "
                                         r"only, the train split has none of it"):
        tr, te = D.train_test_split(data, 0.8, 0)
    assert tr.class_counts()[1] == 0 and te.class_counts()[1] == 1


# --- hub names vs local paths -------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name, local",
    [
        ("some-org/some-data", False), ("imdb", False), ("org/name.v2", False),
        ("./missing", True), ("../missing", True), ("/abs/missing", True), ("~/missing", True),
        ("org/missing.csv", True), ("missing.jsonl", True), ("a/b/c", True), ("has space/x", True),
    ],
)
def test_is_local_name(name, local):
    assert D.is_local_name(name, D.LOCAL_SUFFIXES) is local


def test_org_prefixed_data_name_goes_to_the_hub(monkeypatch, tmp_path):
    calls = []

    def fake_hub(name):
        calls.append(name)
        raise DataError(f"data: {name!r} could not be loaded from the hub (offline)")

    monkeypatch.setattr(D, "_read_hub", fake_hub)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(DataError, match="could not be loaded from the hub"):
        load_text_classification("some-org/some-data")
    assert calls == ["some-org/some-data"]
    for local in ("org/missing.csv", "./missing", "a/b/c"):
        with pytest.raises(DataError, match="no such file"):
            load_text_classification(local)
    assert calls == ["some-org/some-data"]


def test_org_prefixed_model_name_goes_to_the_hub(monkeypatch, tmp_path):
    transformers = pytest.importorskip("transformers")
    from fedlora_fast.federated.simulation import load_model

    calls = []

    def fake_from_pretrained(name, *a, **k):
        calls.append(name)
        raise OSError(f"{name} is not reachable (offline)")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", fake_from_pretrained)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match="cannot load 'some-org/some-model'"):
        load_model("some-org/some-model", 2, 0)
    assert calls == ["some-org/some-model"]
    with pytest.raises(ValueError, match="no such directory './some-model'"):
        load_model("./some-model", 2, 0)
    assert calls == ["some-org/some-model"]


# --- optional extras ----------------------------------------------------------------------------------------
def test_parquet_without_datasets_names_the_extra(tmp_path, monkeypatch):
    p = tmp_path / "d.parquet"
    p.write_bytes(b"PAR1")
    monkeypatch.setitem(sys.modules, "datasets", None)
    with pytest.raises(DataError, match=r"pip install 'fedlora_fast\[data\]'"):
        load_text_classification(str(p))


def test_a_class_label_column_in_another_order_than_the_labels_given_maps_by_name():
    """A ClassLabel column (parquet, hub) stores ids into its own names: with --labels in another order (or
    a silo's classes), each id goes through the column's name, never read as an index into the labels given
    (which relabelled every example, silently)."""
    from fedlora_fast.data import DataError, _to_data

    rows = [{"text": "great film", "label": 1}, {"text": "awful film", "label": 0}, {"text": "fine", "label": 1}]
    names, where = {"label": ["negative", "positive"]}, ["row 1", "row 2", "row 3"]
    import numpy as np

    as_numpy = [{**r, "label": np.int64(r["label"])} for r in rows]  # what a parquet column may hold
    for given in (["positive", "negative"], ["negative", "positive"], ["neutral", "negative", "positive"]):
        for rs in (rows, as_numpy):
            d = _to_data(rs, names, where, None, None, "ds[train]", given)
            assert [d.label_names[y] for y in d.labels] == ["positive", "negative", "positive"], given
    with pytest.raises(DataError, match=r"labels \['positive'\] outside the classes \['negative'\]"):
        _to_data(rows, names, where, None, None, "ds[train]", ["negative"])


def test_a_bool_label_column_maps_alike_in_train_and_test():
    """labels_to_classes names a bool column's classes "0" and "1": a test split (or a silo's file) mapped
    with those classes must read True as "1", not as "True" (which was refused as an unknown class)."""
    from fedlora_fast.data import _to_data

    rows = [{"text": f"t{i}", "label": bool(i % 2)} for i in range(6)]
    where = [f"row {i + 1}" for i in range(6)]
    train = _to_data(rows, {}, where, None, None, "ds[train]")
    test = _to_data(rows, {}, where, None, None, "ds[test]", train.label_names)
    assert train.label_names == ["0", "1"] and test.labels == train.labels == [0, 1, 0, 1, 0, 1]
    for given in (["True", "False"], ["False", "True"]):  # classes named as the bools: mapped by name, any order
        d = _to_data(rows, {}, where, None, None, "ds[test]", given)
        assert [d.label_names[y] for y in d.labels] == [str(r["label"]) for r in rows], given


def test_a_header_naming_a_column_twice_is_refused(tmp_path):
    """``text,label,text``: each row kept the last "text" and trained on it without a word."""
    p = tmp_path / "dup.csv"
    p.write_text("text,label,text\n" + "".join(f"a{i},{i % 2},b{i}\n" for i in range(10)))
    with pytest.raises(DataError, match=r"dup.csv: the header names column\(s\) \['text'\] more than once"):
        load_text_classification(str(p))
    kaggle = tmp_path / "spam.csv"  # Kaggle's SMS file: two named columns and three unnamed, empty ones
    kaggle.write_text("v1,v2,,,\n" + "".join(f"{'ham' if i % 2 else 'spam'},message {i},,,\n" for i in range(10)))
    tr, te = load_text_classification(str(kaggle), text_column="v2", label_column="v1", seed=0)
    assert len(tr) + len(te) == 10


def test_a_json_record_naming_a_key_twice_is_refused(tmp_path):
    """``{"text": .., "label": 1, "label": 0}``: json keeps the last key silently, so the row trained on
    whichever label came second. JSON lines name the line; a whole-file JSON names the key."""
    rows = "".join(f'{{"text": "m{i}", "label": {i % 2}}}\n' for i in range(10))
    p = tmp_path / "dup.jsonl"
    p.write_text(rows + '{"text": "x", "label": 1, "label": 0}\n')
    with pytest.raises(DataError, match=r"dup.jsonl, line 11: the record names the key 'label' twice"):
        load_text_classification(str(p))
    p.write_text('{"text": "x", "label": 1, "label": 0}\n' + rows)  # the first record: its line too
    with pytest.raises(DataError, match=r"dup.jsonl, line 1: the record names the key 'label' twice"):
        load_text_classification(str(p))
    q = tmp_path / "dup.json"
    for text in ('{\n  "data": [{"text": "a", "text": "b", "label": 0}]\n}\n', '{"data": [{"text": "a", "text": "b"}]}'):
        q.write_text(text)  # (a document, on several lines or one: no record line to name)
        with pytest.raises(DataError, match=r"dup.json: an object names the key 'text' twice"):
            load_text_classification(str(q))
    # records split at \n, \r\n or \r only: a raw U+2028 inside a string (valid JSON) does not cut one in two
    odd = tmp_path / "odd.jsonl"
    odd.write_text('{"text": "hello\u2028world", "label": 0}\r{"text": "spam here", "label": 1}\r\n' + rows)
    tr, te = load_text_classification(str(odd), seed=0)
    assert len(tr) + len(te) == 12 and "hello\u2028world" in tr.texts + te.texts
    ok = tmp_path / "ok.jsonl"  # (equal values under different keys, nested objects: fine)
    ok.write_text(rows.replace('"label"', '"meta": {"a": 1, "b": 1}, "label"'))
    tr, te = load_text_classification(str(ok), seed=0)
    assert len(tr) + len(te) == 10


def test_class_names_are_one_class_whatever_their_unicode_form(tmp_path):
    """"café" composed (NFC) and with a combining accent (NFD) look the same and are one class: they made a
    2-class head of one class. The given classes (``--labels``) match either form, and two of them that are
    one name in NFC are refused."""
    from fedlora_fast.federated.simulation import FederatedConfig

    nfc, nfd = "caf\u00e9", "cafe\u0301"
    ids, names = D.labels_to_classes([nfc, nfd, "tea", nfd, "tea"])
    assert names == [nfc, "tea"] and ids == [0, 0, 1, 0, 1]
    p = tmp_path / "u.tsv"
    p.write_text("label\ttext\n" + "".join(f"{[nfd, 'tea', nfc][i % 3]}\tmessage {i}\n" for i in range(12)),
                 encoding="utf-8")
    for given in ([nfc, "tea"], [nfd, "tea"]):
        tr, te = load_text_classification(str(p), seed=0, label_names=given)
        assert sorted(set(tr.labels) | set(te.labels)) == [0, 1]
        assert sum(tr.labels) + sum(te.labels) == 4  # the four "tea" rows; café in either form is class 0

    with pytest.raises(ValueError, match="labels: expected at least two distinct"):
        FederatedConfig(labels=[nfc, nfd]).validate()


def test_integer_labels_are_read_exactly_and_only_ascii_number_text_counts_as_a_number(tmp_path):
    """Labels went through float(): integers past 2**53 merged (three classes read as two, named by values not
    in the file), and "1_0" (float() reads it as 10) merged with "10". Integer text and JSON integers are now
    exact ints; text with "_" or other scripts' digits is a class name; "1.0" is still class 1."""
    from fedlora_fast.data import _label_key, labels_to_classes

    big = [9007199254740993, 9007199254740995, 9007199254740997]
    path = tmp_path / "big.csv"
    path.write_text("text,label\n" + "".join(f"message {i},{big[i % 3]}\n" for i in range(60)))
    train, test = load_text_classification(path, test_fraction=0.2, seed=0)
    assert train.label_names == [str(v) for v in big] and sorted(set(train.labels)) == [0, 1, 2]
    assert labels_to_classes(big * 7)[1] == [str(v) for v in big]
    ids, names = labels_to_classes(["1_0", "10", "2"] * 7)
    assert names == ["10", "1_0", "2"] and ids[:3] == [1, 0, 2]
    assert labels_to_classes(["1.0", " 2", "3e0", "١"] * 7)[1] == ["1.0", "2", "3e0", "١"]  # one text: all text
    assert labels_to_classes(["1.0", " 2", "3e0"] * 7)[1] == ["1", "2", "3"]
    assert [_label_key(v) for v in ("1.0", "1_0", 9007199254740993, True, " 7 ")] == ["1", "1_0", "9007199254740993",
                                                                                      "1", "7"]
    with pytest.raises(DataError, match=r"non-integral values such as \[1.5"):
        labels_to_classes(["1.5", "2"] * 7)


def test_a_huge_integer_label_among_names_is_a_name():
    """Integer text past Python's 4300-digit conversion limit raised an unnamed ValueError where the file's
    labels were names. (The number pattern is linear now; the first one backtracked quadratically on long
    digit runs: measured by hand, not timed here.)"""
    from fedlora_fast.data import _parse_number, labels_to_classes

    assert _parse_number("1" * 2000 + "x") is None and _parse_number("1" * 2000 + ".5x") is None
    huge = "7" * 5000
    assert labels_to_classes(["a", "b", huge] * 7)[1] == sorted(["a", "b", huge])
    assert [_parse_number(t) for t in ("1.", ".5", "1.0e+00", "+.5E-1", "-0", "01")] == [1.0, 0.5, 1.0, 0.05, 0, 1]
