"""Text-classification data for the federated job: load, map labels to classes, split, tokenize once, batch.

Sources: a local csv/tsv (the ``csv`` module), json/jsonl/parquet (through Hugging Face ``datasets`` when
installed; json also without it), or a Hugging Face hub dataset name when the machine is online. The default
is the bundled SMS Spam Collection (``fedlora_fast/data/sms_spam_collection.tsv``, Almeida and Gómez Hidalgo,
UCI, CC BY 4.0: see ``fedlora_fast/data/README.md``) with a stratified held-out test split.
"""

from __future__ import annotations

import csv
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch import Tensor

BUNDLED_SMS = Path(__file__).resolve().parent / "data" / "sms_spam_collection.tsv"
TEXT_CANDIDATES = ("text", "sentence", "sms", "message", "content", "review", "document")
LABEL_CANDIDATES = ("label", "labels", "class", "category", "target")
LOCAL_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".parquet")
MAX_CLASSES = 1000


class DataError(ValueError):
    """Input data that cannot be used: the message names the argument, what was expected and what was found."""


@dataclass
class TextClassificationData:
    """Texts with integer class ids in ``[0, len(label_names))``."""

    texts: list[str]
    labels: list[int]
    label_names: list[str]
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)

    def subset(self, indices: Sequence[int]) -> "TextClassificationData":
        return TextClassificationData(
            [self.texts[i] for i in indices], [self.labels[i] for i in indices], self.label_names, self.source
        )

    def class_counts(self) -> list[int]:
        return np.bincount(np.asarray(self.labels, dtype=np.int64), minlength=len(self.label_names)).tolist()


# --- reading --------------------------------------------------------------------------------------------
def _read_delimited(path: Path) -> list[dict]:
    tsv = path.suffix.lower() == ".tsv"
    csv.field_size_limit(1 << 24)
    with open(path, newline="", encoding="utf-8-sig") as f:  # -sig: a byte-order mark (Excel's "CSV UTF-8") is dropped
        # TSV files (the bundled SMS data among them) are unquoted: a '"' is part of the text.
        reader = csv.DictReader(f, delimiter="\t" if tsv else ",", quoting=csv.QUOTE_NONE if tsv else csv.QUOTE_MINIMAL)
        rows = list(reader)
        if reader.fieldnames is None:
            raise DataError(f"data: {path} is empty; expected a header row and at least one example")
    return rows


def _read_json(path: Path) -> list[dict]:
    text = path.read_text(encoding="utf-8-sig")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError:
        try:
            obj = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise DataError(f"data: {path} is neither JSON nor JSON lines ({e})") from None
    if isinstance(obj, dict):
        lists = [v for v in obj.values() if isinstance(v, list)]
        if len(lists) == 1 and all(isinstance(r, dict) for r in lists[0]):
            obj = lists[0]
        elif all(isinstance(v, list) for v in obj.values()):  # column-oriented
            lengths = {k: len(v) for k, v in obj.items()}
            if len(set(lengths.values())) > 1:
                raise DataError(f"data: {path}: column-oriented JSON with columns of different lengths {lengths}")
            keys = list(obj)
            obj = [dict(zip(keys, vals)) for vals in zip(*obj.values())]
    if not isinstance(obj, list) or not all(isinstance(r, dict) for r in obj):
        raise DataError(f"data: {path}: expected a list of records (objects) or JSON lines")
    return obj


def _datasets_rows(ds) -> tuple[list[dict], dict]:
    """Rows of a ``datasets.Dataset`` and ``{column: class names}`` for its ClassLabel columns."""
    names = {}
    for col, feat in ds.features.items():
        if type(feat).__name__ == "ClassLabel":
            names[col] = list(feat.names)
    return ds.to_list(), names


def _read_local(path: Path) -> tuple[list[dict], dict]:
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv"):
        return _read_delimited(path), {}
    try:
        import datasets  # noqa: F401
    except ImportError:
        datasets = None
    if suffix in (".json", ".jsonl"):
        return _read_json(path), {}
    if suffix == ".parquet":
        if datasets is None:
            raise DataError(f"data: reading {path} (parquet) needs the 'datasets' package: pip install datasets")
        import datasets as hf

        return _datasets_rows(hf.load_dataset("parquet", data_files=str(path), split="train"))
    raise DataError(f"data: {path}: expected a file ending in one of {LOCAL_SUFFIXES}, got {suffix or 'no suffix'!r}")


def _read_hub(name: str) -> tuple[tuple[list[dict], dict], tuple[list[dict], dict] | None]:
    try:
        import datasets as hf
    except ImportError:
        raise DataError(
            f"data: {name!r} is not a local file, and loading a hub dataset needs the 'datasets' package "
            "(pip install datasets) and network access"
        ) from None
    try:
        dd = hf.load_dataset(name)
    except Exception as e:
        raise DataError(f"data: {name!r} is not a local file and could not be loaded from the hub ({type(e).__name__}: {e})") from None
    if "train" not in dd:
        raise DataError(f"data: hub dataset {name!r} has no 'train' split (splits: {list(dd)})")
    train_rows = _datasets_rows(dd["train"])
    test_rows = None
    for split in ("test", "validation"):  # GLUE-style test splits carry label -1: skip them
        if split in dd:
            rows, names = _datasets_rows(dd[split])
            labels = [c for c in (rows[0] if rows else {}) if c.lower() in LABEL_CANDIDATES]
            if rows and not (labels and all(r[labels[0]] in (-1, None) for r in rows[:100])):
                test_rows = (rows, names)
                break
    return train_rows, test_rows


# --- columns and labels -----------------------------------------------------------------------------------
def _pick_column(columns: list[str], wanted: str | None, candidates: tuple[str, ...], what: str) -> str:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{what}: no column {wanted!r} in the data; its columns are {columns}")
        return wanted
    lower = {c.lower(): c for c in columns}
    for cand in candidates:
        if cand in lower:
            return lower[cand]
    raise DataError(f"{what}: not given and none of {list(candidates)} is a column; the data's columns are {columns}")


def labels_to_classes(values: list, class_names: list[str] | None = None, what: str = "label_column") -> tuple[list[int], list[str]]:
    """Map raw label values (strings, ints, integral floats, bools) to class ids ``0..C-1``.

    Raises:
        DataError: missing labels, non-integral numbers, fewer than 2 classes, or so many distinct values
            that the column is not a set of classes.
    """
    if class_names is not None and all(isinstance(v, int) for v in values):
        bad = [v for v in values if not 0 <= v < len(class_names)]
        if bad:
            raise DataError(f"{what}: class ids must be in [0, {len(class_names)}), found {bad[:5]}")
        return list(values), list(class_names)
    missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())]
    if missing:
        raise DataError(f"{what}: {len(missing)} example(s) have no label (first at row {missing[0]})")
    if all(isinstance(v, str) for v in values):
        stripped = [v.strip() for v in values]
        try:
            values = [float(v) for v in stripped]
        except ValueError:
            names = sorted(set(stripped))
            index = {n: i for i, n in enumerate(names)}
            ids, names = [index[v] for v in stripped], names
            return _check_classes(ids, names, len(values), what)
    if not all(isinstance(v, (int, float, bool, np.integer, np.floating)) for v in values):
        kinds = sorted({type(v).__name__ for v in values})
        raise DataError(f"{what}: labels must be strings or numbers, found values of type {kinds}")
    nums = [float(v) for v in values]
    bad = [v for v in nums if not math.isfinite(v) or v != int(v)]
    if bad:
        raise DataError(
            f"{what}: labels must be classes (strings or integers), found non-integral values such as {bad[:3]}; "
            "regression targets are not supported"
        )
    uniq = sorted({int(v) for v in nums})
    index = {v: i for i, v in enumerate(uniq)}
    return _check_classes([index[int(v)] for v in nums], [str(v) for v in uniq], len(values), what)


def _label_key(v) -> str:
    """A raw label as the class name ``labels_to_classes`` would give it: integral numbers (also as text,
    ``"1.0"``) as ``"1"``, other text stripped."""
    if isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool):
        f = float(v)
        return str(int(f)) if math.isfinite(f) and f == int(f) else str(v)
    text = str(v).strip()
    try:
        f = float(text)
    except ValueError:
        return text
    return str(int(f)) if math.isfinite(f) and f == int(f) else text


def _check_classes(ids: list[int], names: list[str], n: int, what: str) -> tuple[list[int], list[str]]:
    if len(names) < 2:
        raise DataError(f"{what}: expected at least 2 classes, found {len(names)} ({names})")
    if len(names) > MAX_CLASSES or (n >= 20 and len(names) > n // 2):
        raise DataError(
            f"{what}: {len(names)} distinct values in {n} examples: this column does not look like class "
            "labels; pick the label column with --label-column"
        )
    return ids, names


def _to_data(rows: list[dict], names: dict, text_column: str | None, label_column: str | None, source: str,
             label_names: list[str] | None = None) -> TextClassificationData:
    if not rows:
        raise DataError(f"data: {source} has no examples")
    columns = list(rows[0].keys())
    tcol = _pick_column(columns, text_column, TEXT_CANDIDATES, "text_column")
    lcol = _pick_column(columns, label_column, LABEL_CANDIDATES, "label_column")
    if tcol == lcol:
        raise DataError(f"text_column and label_column: both are {tcol!r}; they must differ")
    texts = []
    for i, r in enumerate(rows):
        t = r.get(tcol)
        if not isinstance(t, str):
            raise DataError(f"text_column: row {i} of {source} has {type(t).__name__} in {tcol!r}, expected text")
        texts.append(t)
    raw = [r.get(lcol) for r in rows]
    if label_names is not None:  # a test split: map with the training split's classes
        lookup = {n: i for i, n in enumerate(label_names)}
        if names.get(lcol) == label_names:
            ids = [int(v) for v in raw]
        else:
            keys = [_label_key(v) for v in raw]
            unknown = sorted({k for k in keys if k not in lookup})
            if unknown and all(k.lstrip("-").isdigit() for k in keys):  # integer labels: class ids in name order
                ids = [int(k) for k in keys]
                bad = sorted({i for i in ids if not 0 <= i < len(label_names)})
                if bad:
                    raise DataError(f"label_column: {source} has class ids {bad[:5]} outside [0, {len(label_names)}) "
                                    f"(the classes {label_names})")
                return TextClassificationData(texts, ids, label_names, source)
            if unknown:
                raise DataError(f"label_column: {source} has labels {unknown[:5]} outside the classes {label_names}")
            ids = [lookup[k] for k in keys]
        return TextClassificationData(texts, ids, label_names, source)
    ids, classes = labels_to_classes(raw, names.get(lcol))
    return TextClassificationData(texts, ids, classes, source)


def train_test_split(data: TextClassificationData, test_fraction: float, seed: int) -> tuple[TextClassificationData, TextClassificationData]:
    """A stratified split: every class keeps its share in both parts (about ``round(count * test_fraction)``
    to test), and identical texts stay on one side (a message in both would be tested on after training on
    it: the bundled SMS data holds ~400 repeated messages)."""
    if not 0.0 < float(test_fraction) < 1.0:
        raise DataError(f"test_fraction: expected a number in (0, 1), got {test_fraction!r}")
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = {}
    for i, t in enumerate(data.texts):
        groups.setdefault(t, []).append(i)
    by_class: list[list[list[int]]] = [[] for _ in data.label_names]
    for members in groups.values():  # a group goes with its first example's class
        by_class[data.labels[members[0]]].append(members)
    test_idx = []
    for c, class_groups in enumerate(by_class):
        want = int(round(sum(len(g) for g in class_groups) * test_fraction))
        taken = 0
        for k in rng.permutation(len(class_groups)):
            if taken >= want:
                break
            test_idx += class_groups[k]
            taken += len(class_groups[k])
    test_set = set(test_idx)
    train_idx = [i for i in range(len(data)) if i not in test_set]
    if not train_idx or not test_idx:
        raise DataError(f"test_fraction={test_fraction}: leaves an empty train or test split of {len(data)} examples")
    return data.subset(train_idx), data.subset(sorted(test_idx))


def load_text_classification(
    source: str | os.PathLike | None = None,
    *,
    text_column: str | None = None,
    label_column: str | None = None,
    test_fraction: float = 0.2,
    seed: int = 0,
    label_names: list[str] | None = None,
) -> tuple[TextClassificationData, TextClassificationData]:
    """``(train, test)`` for a text-classification source.

    Args:
        source: a local csv/tsv/json/jsonl/parquet file, a hub dataset name, or None for the bundled SMS
            Spam Collection (text column ``SMS``, label column ``Label``: ham/spam).
        text_column, label_column: column names; None: guessed from common names.
        test_fraction: share held out (stratified) when the source has no test split.
        seed: the split's seed.
        label_names: the classes in id order; None: the classes found in the data. Given, a source may
            hold only some of them (one silo's share) and the ids stay those of every other silo.
    Raises:
        DataError: a missing file, an unknown column, labels that are not classes (or not in ``label_names``).
    """
    if source is None:
        source = BUNDLED_SMS
        text_column = text_column or "SMS"
        label_column = label_column or "Label"
    path = Path(source).expanduser()
    looks_local = path.suffix.lower() in LOCAL_SUFFIXES or os.sep in str(source) or str(source).startswith(".")
    if path.is_file():
        rows, names = _read_local(path)
        data = _to_data(rows, names, text_column, label_column, str(path), label_names)
        return train_test_split(data, test_fraction, seed)
    if looks_local or path.exists():
        raise DataError(f"data: no such file {str(source)!r} (expected a csv/tsv/json/jsonl/parquet file or a hub dataset name)")
    train_rows, test_rows = _read_hub(str(source))
    train = _to_data(*train_rows, text_column, label_column, f"{source}[train]", label_names)
    if test_rows is None:
        return train_test_split(train, test_fraction, seed)
    return train, _to_data(*test_rows, text_column, label_column, f"{source}[test]", train.label_names)


# --- tokens and batches -----------------------------------------------------------------------------------
def tokenize(tokenizer, texts: Sequence[str], max_length: int) -> list[list[int]]:
    """Token ids of every text, truncated to ``max_length``, unpadded (batches pad dynamically)."""
    if int(max_length) < 2:
        raise ValueError(f"max_length: expected an int >= 2, got {max_length!r}")
    return tokenizer(list(texts), truncation=True, max_length=int(max_length), padding=False)["input_ids"]


def collate(ids: Sequence[Sequence[int]], pad_id: int, length: int | None = None) -> tuple[Tensor, Tensor]:
    """Pad a batch to its longest sequence (or to ``length``): ``(input_ids, attention_mask)``, both (n, T)
    int64, right-padded."""
    n, t = len(ids), max((len(x) for x in ids), default=1)
    if length is not None:
        if length < t:
            raise ValueError(f"length: expected >= the longest sequence ({t}), got {length}")
        t = length
    input_ids = torch.full((n, t), int(pad_id), dtype=torch.long)
    mask = torch.zeros((n, t), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, : len(x)] = torch.as_tensor(x, dtype=torch.long)
        mask[i, : len(x)] = 1
    return input_ids, mask
