"""Downstream emotion datasets (paper 4.1, 4.4): readers for the published layouts.

Every reader returns a :class:`TaskData`: a task kind, the label names, and ``train`` / ``val`` /
``test`` :class:`Split` s of image paths and targets. Images are validated on read (exists, not
empty, decodes fully, not a decompression bomb); a bad image is dropped into ``quarantine`` with a
reason from :data:`pacl_ray.formats.tables.QUARANTINE_REASONS`, exactly as ingest does for pairs, and a bad
annotation row is quarantined with the file, row and field, with the reasons ingest gives the same
faults: an empty cell is missing_field ("field 'level1' is empty"), a cell that does not parse (a
non-number rating, a label index that is not an integer, an unknown class) bad_value, a parsed value
of the wrong type (a number among Emotic's category names, a name among its VAD numbers, an object
where a list belongs) wrong_type. A table whose header lacks a column every row needs is one
:class:`DatasetError` naming the file, the missing column, the columns found and those expected.

Targets per kind (``Split.targets``):

=============  =====================  ==================================================
kind           dtype / shape          meaning
=============  =====================  ==================================================
single         int64 [N]              class index into ``label_names[0]``
hierarchical   int64 [N, L]           one class index per level into ``label_names[l]``
multilabel     float32 [N, C]         multi-hot over ``label_names[0]`` (C categories)
vad            float32 [N, 3]         valence, arousal, dominance scaled to [0, 1]
=============  =====================  ==================================================

Splits (paper 4.2): the original split when the dataset ships one, else a seeded random 8:1:1
split (``split_seed``). When only train and test are given (WebEmo), validation is a seeded 1/9 of
train, so the three parts are again about 8:1:1. The split is drawn before images are validated, so
a bad image never moves another image to a different split.

Layouts (``ROOT`` is the path given in the task spec; see :mod:`pacl_ray.evaluation.tasks`):

* **ImageFolder** (:func:`read_imagefolder`) -- ``ROOT/{train,val,test}/<class>/<image>``
  (``val`` may be spelled ``valid`` or ``validation``), or ``ROOT/<class>/<image>`` split 8:1:1.
  Class names are the sorted folder names. Images are files with an image extension, any depth
  below the class folder.
* **FI** (:func:`read_fi`, You et al. 2016) -- the public release is one folder per emotion:
  ``ROOT/<emotion>/<emotion>_<n>.jpg`` (also accepted under ``ROOT/emotion_dataset/``), emotions
  ``amusement anger awe contentment disgust excitement fear sadness``; or the same classes in the
  pre-split ImageFolder layout. Folder names are matched case-insensitively; any other folder is an
  error naming it.
* **Emotion-6** (:func:`read_emotion6`, Panda et al. 2018) -- ``ROOT/<emotion>/*.jpg`` (also under
  ``ROOT/images/``), emotions ``anger disgust fear joy sadness surprise``; or pre-split.
* **UnbiasedEmo** (:func:`read_unbiasedemo`, Panda et al. 2018) -- ``ROOT/images/<emotion>/<object>/
  *.jpg`` (``images/`` optional), emotions ``anger fear joy love sadness surprise``; the label is the
  emotion folder, the object sub-folder is ignored; or pre-split.
* **FI-2** (:func:`read_fi2`, paper 4.5.1 / Table 2) -- FI read as above, its 8 classes folded into
  2 (:data:`FI_POLARITY`): amusement, awe, contentment, excitement are ``positive``; anger, disgust,
  fear, sadness ``negative``. Same images and split as FI. Task spec ``single:fi2=ROOT``.
* **WebEmo** (:func:`read_webemo`, Panda et al. 2018; three levels: 2 polarities, 7 second-level
  emotions (Parrott's six primary emotions and confusion), 25 fine emotions) -- either

  - ``ROOT/{train,val,test}.csv`` with a header and columns ``image,level1,level2,level3`` (class
    names; ``image`` relative to ``ROOT``), ``val.csv`` optional; or
  - the published lists ``ROOT/train25.txt`` and ``ROOT/test25.txt`` (optional ``val25.txt``): one
    ``<url-or-path> <label>`` per line, ``label`` an index 0-24 into the 25 fine emotions in alphabetical order
    (:data:`WEBEMO_FINE`), images downloaded to ``ROOT/images/<basename of the url>``. Levels 1 and
    2 come from :data:`WEBEMO_HIERARCHY`, or from ``ROOT/hierarchy.csv`` (columns
    ``level3,level2,level1``) when present.
* **WebEmo per level** (:func:`webemo_levels`, paper 4.5.1 / Table 2: "tested on each level
  separately") -- WebEmo read as above, each level a single-label task of its own (:data:`WEBEMO_LEVELS`):
  ``webemo2`` polarity, ``webemo7`` the second level, ``webemo25`` the fine emotions (the names are
  the paper's class counts; the metric columns carry the actual ones, e.g. a ``hierarchy.csv`` with
  6 second-level classes gives ``Acc-6``). Same images and split as WebEmo. Task specs
  ``single:webemo7=ROOT`` for one level, ``levels:webemo=ROOT`` for all three in one evaluation
  (:mod:`pacl_ray.evaluation.tasks`).
* **Emotic** (:func:`read_emotic`, Kosti et al. 2017) -- the CSVs of the widely used conversion of
  ``Annotations.mat`` (one row per annotated person): ``ROOT/{train,val,test}.csv`` (also under
  ``ROOT/annotations/`` or ``ROOT/emotic_pre/``) with columns ``Folder, Filename,
  Categorical_Labels, Continuous_Labels`` (others ignored), e.g.
  ``mscoco/images,COCO_val2014_000000562243.jpg,"['Engagement', 'Happiness']","[6, 5, 7]"``; the
  image is ``ROOT/<Folder>/<Filename>``. **Choice** (whole image, as the paper evaluates): rows of
  one image are merged: categories are the union over persons, VAD the mean over persons, scaled
  from 1-10 to [0, 1] by dividing by 10.
* **IAPS** (:func:`read_iaps`, Lang et al.) -- a ratings table in the technical manual's layout,
  ``ROOT/ratings.csv`` / ``.tsv`` / ``.txt`` or ``ROOT/AllSubjects*.txt`` (comma, tab or whitespace
  separated, with a header) holding columns ``IAPS`` (picture number, e.g. ``2352.2``), ``valmn``,
  ``aromn`` and ``dom1mn`` (or ``dommn``/``dom2mn``); images ``ROOT/images/<IAPS>.<ext>`` (or
  directly under ``ROOT``). Ratings 1-9 are scaled to [0, 1] by dividing by 9; seeded 8:1:1 split.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Sequence

import numpy as np

from pacl_ray.formats import images
from pacl_ray.formats.manifests import is_hidden

KINDS = ("single", "hierarchical", "multilabel", "vad")
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 89_478_485  # Pillow's default decompression-bomb limit
VAD_NAMES = ["valence", "arousal", "dominance"]

FI_CLASSES = ["amusement", "anger", "awe", "contentment", "disgust", "excitement", "fear", "sadness"]
# FI-2 (paper 4.5.1, Table 2; following MDAN [40]): FI's 8 classes folded into their polarity.
FI_POLARITY = {
    "amusement": "positive", "awe": "positive", "contentment": "positive", "excitement": "positive",
    "anger": "negative", "disgust": "negative", "fear": "negative", "sadness": "negative",
}
FI2_CLASSES = sorted(set(FI_POLARITY.values()))  # ["negative", "positive"]
EMOTION6_CLASSES = ["anger", "disgust", "fear", "joy", "sadness", "surprise"]
UNBIASEDEMO_CLASSES = ["anger", "fear", "joy", "love", "sadness", "surprise"]
EMOTIC_CATEGORIES = [
    "Affection", "Anger", "Annoyance", "Anticipation", "Aversion", "Confidence", "Disapproval",
    "Disconnection", "Disquietment", "Doubt/Confusion", "Embarrassment", "Engagement", "Esteem",
    "Excitement", "Fatigue", "Fear", "Happiness", "Pain", "Peace", "Pleasure", "Sadness",
    "Sensitivity", "Suffering", "Surprise", "Sympathy", "Yearning",
]
# WebEmo's 25 fine emotions -> (second level, polarity): 2 / 7 / 25 classes (paper 4.1; Panda et al.
# 2018). The 7 second-level classes are Parrott's six primary emotions plus confusion, which is its
# own class (negative). **Choice**: the other links are reconstructed from Parrott's tree (the
# release gives indices only; gratitude sits under love). Override with ROOT/hierarchy.csv when you
# have the authors' mapping.
WEBEMO_HIERARCHY = {
    "affection": ("love", "positive"), "cheerfulness": ("joy", "positive"),
    "confusion": ("confusion", "negative"), "contentment": ("joy", "positive"),
    "disappointment": ("sadness", "negative"), "disgust": ("anger", "negative"),
    "enthrallment": ("joy", "positive"), "envy": ("anger", "negative"),
    "exasperation": ("anger", "negative"), "gratitude": ("love", "positive"),
    "horror": ("fear", "negative"), "irritation": ("anger", "negative"),
    "lust": ("love", "positive"), "neglect": ("sadness", "negative"),
    "nervousness": ("fear", "negative"), "optimism": ("joy", "positive"),
    "pride": ("joy", "positive"), "rage": ("anger", "negative"), "relief": ("joy", "positive"),
    "sadness": ("sadness", "negative"), "shame": ("sadness", "negative"),
    "suffering": ("sadness", "negative"), "surprise": ("surprise", "positive"),
    "sympathy": ("sadness", "negative"), "zest": ("joy", "positive"),
}
WEBEMO_FINE = sorted(WEBEMO_HIERARCHY)
WEBEMO_LEVEL2 = sorted({second for second, _ in WEBEMO_HIERARCHY.values()})  # 7 classes
# Table 2's per-level WebEmo tasks: single-label dataset name -> level index (0 polarity, 1 second
# level, 2 fine emotions), in the paper's column order.
WEBEMO_LEVELS = {"webemo2": 0, "webemo7": 1, "webemo25": 2}


WEBEMO_CSV_COLUMNS = [["image", "path"], ["level1"], ["level2"], ["level3"]]
IAPS_COLUMNS = [["IAPS"], ["valmn"], ["aromn"], ["dom1mn", "dommn", "dom2mn"]]


class DatasetError(ValueError):
    """A dataset's layout or annotations are wrong; the message names the file, row and field."""


# --------------------------------------------------------------------------- containers


@dataclass
class Split:
    """One split: image paths, their targets (see the module table) and where each came from."""

    paths: list[str]
    targets: np.ndarray
    sources: list[str]

    def __len__(self) -> int:
        return len(self.paths)


@dataclass
class TaskData:
    """A validated downstream dataset. ``label_names`` holds one list per output group:
    single/multilabel ``[classes]``, hierarchical ``[level1, level2, level3]``, vad ``[VAD_NAMES]``."""

    name: str
    kind: str
    label_names: list[list[str]]
    splits: dict[str, Split]
    quarantine: list[dict] = field(default_factory=list)
    fingerprints: dict[str, str] = field(default_factory=dict)  # split -> content hash

    @property
    def out_dims(self) -> list[int]:
        """Head widths: one per level for hierarchical, else a single group."""
        return [len(names) for names in self.label_names]

    def summary(self) -> dict:
        return {
            "name": self.name, "kind": self.kind, "out_dims": self.out_dims,
            "sizes": {k: len(v) for k, v in self.splits.items()},
            "quarantined": len(self.quarantine),
        }


@dataclass
class _Record:
    path: str
    target: object
    source: str
    split: str | None = None  # None = assign by the seeded 8:1:1 split


# --------------------------------------------------------------------------- image validation


def check_image(path: str, max_pixels: int = MAX_IMAGE_PIXELS) -> tuple[str, str] | None:
    """Validate one image file (local path or pyarrow URI) with the shared decoder
    (:mod:`pacl_ray.formats.images`, the one training and feature extraction use): None when it
    decodes fully, else ``(reason, detail)`` with reason in
    :data:`pacl_ray.formats.tables.QUARANTINE_REASONS` (missing_file, unreadable_file,
    zero_size_image, decompression_bomb, corrupt_image, truncated_image)."""
    try:
        images.decode(images.read_image_bytes(path), max_pixels)
    except images.ImageRejected as err:
        return err.reason, err.detail if path in err.detail else f"{path}: {err.detail}"
    return None


def quarantine_row(source: str, field_name: str, reason: str, detail: str, row_id: str = "") -> dict:
    """A row of :data:`pacl_ray.formats.tables.QUARANTINE`."""
    return {"id": row_id or None, "source": source, "field": field_name, "reason": reason, "detail": detail}


def _validate(records: list[_Record], quarantine: list[dict], workers: int = 8) -> list[_Record]:
    """Drop records whose image is bad (quarantined with the reason); keeps order."""
    with ThreadPoolExecutor(max_workers=workers) as pool:
        verdicts = list(pool.map(lambda r: check_image(r.path), records))
    good = []
    for record, verdict in zip(records, verdicts):
        if verdict is None:
            good.append(record)
        else:
            quarantine.append(quarantine_row(record.source, "image", verdict[0], verdict[1], record.path))
    return good


# --------------------------------------------------------------------------- assembly


def split_indices(n: int, seed: int, fractions: Sequence[float] = (0.8, 0.1, 0.1)) -> list[np.ndarray]:
    """A seeded random partition of range(n) into parts of the given fractions (last takes the rest)."""
    order = np.random.default_rng(seed).permutation(n)
    bounds = np.floor(np.cumsum(fractions)[:-1] * n + 1e-9).astype(int)
    return np.split(order, bounds)


def _assign_splits(records: list[_Record], seed: int) -> None:
    """Fill in missing splits: all missing -> 8:1:1; train given without val -> val = 1/9 of train."""
    unassigned = [r for r in records if r.split is None]
    if unassigned:
        for part, name in zip(split_indices(len(unassigned), seed), SPLITS):
            for i in part:
                unassigned[i].split = name
    if not any(r.split == "val" for r in records):
        train = [r for r in records if r.split == "train"]
        _, val = split_indices(len(train), seed, (8 / 9, 1 / 9))
        for i in val:
            train[i].split = "val"


def _fingerprint(split: Split) -> str:
    """Content hash of a split: paths, targets, and each file's size and mtime."""
    digest = hashlib.sha256()
    for path in split.paths:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    digest.update(np.ascontiguousarray(split.targets).tobytes())
    digest.update(str(split.targets.dtype).encode())
    return digest.hexdigest()[:16]


def _stack(kind: str, targets: list, width: int) -> np.ndarray:
    if kind in ("single", "hierarchical"):
        return np.asarray(targets, dtype=np.int64).reshape((len(targets),) + (() if kind == "single" else (width,)))
    return np.asarray(targets, dtype=np.float32).reshape(len(targets), width)


def _build(
    name: str, kind: str, label_names: list[list[str]], records: list[_Record], quarantine: list[dict],
    seed: int, limit: int = 0,
) -> TaskData:
    """Split, validate images, and pack targets into arrays."""
    _assign_splits(records, seed)
    if limit:  # cap each split (quick runs); a seeded choice so it is stable
        capped = []
        for split in SPLITS:
            part = [r for r in records if r.split == split]
            keep = sorted(np.random.default_rng(seed).permutation(len(part))[:limit])
            capped.extend(part[i] for i in keep)
        records = capped
    good = _validate(records, quarantine)
    if not good:
        raise DatasetError(f"{name}: no valid images (first problem: {quarantine[0] if quarantine else 'none found'})")
    if kind == "single":
        _check_every_class(name, label_names[0], records, good)
    width = len(label_names[0]) if kind == "multilabel" else len(label_names) if kind == "hierarchical" else 3
    splits = {}
    for split in SPLITS:
        part = [r for r in good if r.split == split]
        splits[split] = Split(
            paths=[r.path for r in part], targets=_stack(kind, [r.target for r in part], width),
            sources=[r.source for r in part],
        )
        if not part:
            raise DatasetError(f"{name}: the {split} split is empty after validation ({len(good)} valid images)")
    data = TaskData(name=name, kind=kind, label_names=label_names, splits=splits, quarantine=quarantine)
    data.fingerprints = {k: _fingerprint(v) for k, v in splits.items()}
    return data


def _check_every_class(name: str, classes: list[str], records: list[_Record], good: list[_Record]) -> None:
    """A class whose images all failed validation is an error naming its folder(s)."""
    have = {r.target for r in good}
    for label, cls in enumerate(classes):
        folders = sorted({os.path.dirname(r.path) for r in records if r.target == label})
        if folders and label not in have:
            raise DatasetError(
                f"{name}: class {cls!r} has no valid image (folder {', '.join(folders)}; "
                f"see the quarantine for why each image failed)"
            )


# --------------------------------------------------------------------------- folder layouts


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _images_below(directory: str) -> list[str]:
    """Image files below a directory, recursively, sorted; hidden and system entries (``.*``,
    macOS ``._*`` resource forks and ``__MACOSX/``, ``Thumbs.db``, ``@eaDir``) skipped."""
    found = []
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames[:] = sorted(d for d in dirnames if not is_hidden(d))
        found.extend(os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f) and not is_hidden(f))
    return found


def _subdirs(directory: str) -> list[str]:
    """Visible sub-folders (hidden and system folders such as ``__MACOSX`` skipped), sorted."""
    return sorted(d for d in os.listdir(directory) if os.path.isdir(os.path.join(directory, d)) and not is_hidden(d))


def _split_dirs(root: str) -> dict[str, str] | None:
    """``{split: dir}`` when ROOT is pre-split (train/ and test/ at least), else None."""
    names = {d.lower(): d for d in _subdirs(root)}
    aliases = {"train": ["train"], "val": ["val", "valid", "validation"], "test": ["test"]}
    found = {}
    for split, spellings in aliases.items():
        for spelling in spellings:
            if spelling in names:
                found[split] = os.path.join(root, names[spelling])
                break
    return found if "train" in found and "test" in found else None


def _require_dir(root: str, name: str) -> str:
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise DatasetError(f"{name}: dataset root {root} is not a directory")
    return root


def _class_folder_records(
    root: str, name: str, classes: list[str] | None, split: str | None, quarantine: list[dict],
) -> tuple[list[str], list[_Record]]:
    """Records of ``root/<class>/**/<image>``; ``classes=None`` takes the sorted folder names."""
    folders = _subdirs(root)
    if classes is None:
        classes = folders
    lookup = {c.lower(): i for i, c in enumerate(classes)}
    records = []
    for folder in folders:
        if folder.lower() not in lookup:
            raise DatasetError(
                f"{name}: unexpected class folder {os.path.join(root, folder)!r}; expected one of {classes}"
            )
        label = lookup[folder.lower()]
        found = _images_below(os.path.join(root, folder))
        if not found:
            raise DatasetError(f"{name}: class folder {os.path.join(root, folder)!r} has no images")
        records.extend(_Record(path, label, path, split) for path in found)
    for path in sorted(os.listdir(root)):
        full = os.path.join(root, path)
        if os.path.isfile(full) and _is_image(path) and not is_hidden(path):
            quarantine.append(quarantine_row(full, "label", "missing_field", "image is not inside a class folder", full))
    return classes, records


def _read_class_folders(
    root: str, name: str, classes: list[str] | None, seed: int, limit: int, roots: Sequence[str] = ("",),
) -> TaskData:
    """Shared reader of the ImageFolder-style layouts (pre-split, or one folder split 8:1:1)."""
    root = _require_dir(root, name)
    for sub in roots:  # e.g. FI's emotion_dataset/ wrapper folder
        candidate = os.path.join(root, sub) if sub else root
        if os.path.isdir(candidate) and (_split_dirs(candidate) or (classes and _has_class_folder(candidate, classes))):
            root = candidate
            break
    quarantine: list[dict] = []
    splits = _split_dirs(root)
    records: list[_Record] = []
    if splits:
        if classes is None:  # a split may lack a rare class: the classes are the union
            classes = sorted({d for directory in splits.values() for d in _subdirs(directory)})
        for split, directory in splits.items():
            records.extend(_class_folder_records(directory, name, classes, split, quarantine)[1])
    else:
        classes, records = _class_folder_records(root, name, classes, None, quarantine)
    if not classes or not records:
        raise DatasetError(f"{name}: no images found in class folders under {root}")
    return _build(name, "single", [list(classes)], records, quarantine, seed, limit)


def _has_class_folder(directory: str, classes: list[str]) -> bool:
    wanted = {c.lower() for c in classes}
    return any(d.lower() in wanted for d in _subdirs(directory))


def read_imagefolder(root: str, name: str = "imagefolder", seed: int = 0, limit: int = 0) -> TaskData:
    """Generic single-label layout: ``ROOT/{train,val,test}/<class>/*`` or ``ROOT/<class>/*``."""
    return _read_class_folders(root, name, None, seed, limit)


def read_fi(root: str, seed: int = 0, limit: int = 0) -> TaskData:
    """FI (8 classes): ``ROOT/<emotion>/*`` or ``ROOT/emotion_dataset/<emotion>/*`` or pre-split."""
    return _read_class_folders(root, "fi", FI_CLASSES, seed, limit, roots=("", "emotion_dataset"))


def read_fi2(root: str, seed: int = 0, limit: int = 0) -> TaskData:
    """FI-2: :func:`read_fi` with targets folded to polarity by :data:`FI_POLARITY` (int64 [N] into
    :data:`FI2_CLASSES`); same images, split and quarantine as FI (paper 4.5.1, Table 2)."""
    data = read_fi(root, seed=seed, limit=limit)
    fold = np.array([FI2_CLASSES.index(FI_POLARITY[name]) for name in FI_CLASSES], dtype=np.int64)
    splits = {k: Split(v.paths, fold[v.targets], v.sources) for k, v in data.splits.items()}
    folded = TaskData(name="fi2", kind="single", label_names=[list(FI2_CLASSES)], splits=splits,
                      quarantine=data.quarantine)
    folded.fingerprints = {k: _fingerprint(v) for k, v in splits.items()}
    return folded


def read_emotion6(root: str, seed: int = 0, limit: int = 0) -> TaskData:
    """Emotion-6 (6 classes): ``ROOT/<emotion>/*`` or ``ROOT/images/<emotion>/*`` or pre-split."""
    return _read_class_folders(root, "emotion6", EMOTION6_CLASSES, seed, limit, roots=("", "images"))


def read_unbiasedemo(root: str, seed: int = 0, limit: int = 0) -> TaskData:
    """UnbiasedEmo (6 classes): ``ROOT/images/<emotion>/<object>/*`` (``images/`` optional)."""
    return _read_class_folders(root, "unbiasedemo", UNBIASEDEMO_CLASSES, seed, limit, roots=("images", ""))


# --------------------------------------------------------------------------- table layouts


def _read_table(path: str, quarantine: list[dict], required: Sequence[Sequence[str]] = ()) -> list[tuple[str, dict]]:
    """``(where, row)`` of a CSV/TSV/whitespace table with a header (keys and cells stripped);
    ``where`` is ``path:line`` of the row's first line.

    ``required`` lists the columns every row needs, each as its accepted spellings (matched
    case-insensitively, like :func:`_column`): a header without one is a whole-file
    :class:`DatasetError` naming the file, the missing column, the columns found and the columns
    expected, raised once instead of quarantining every row as missing_field.

    Quoted cells may hold newlines and delimiters (RFC 4180). A row that cannot be parsed (broken
    quoting, a wrong number of fields) is quarantined as malformed_record and costs only itself.
    Bytes that are not UTF-8 are kept (as surrogates) and reported when the cell is used
    (undecodable_text), so they cost only their row.
    """
    with open(path, "rb") as handle:
        text = handle.read().decode("utf-8-sig", "surrogateescape")
    lines = text.splitlines(keepends=True)
    first = next((i for i, line in enumerate(lines) if line.strip()), None)
    if first is None:
        raise DatasetError(f"{path}: empty table")
    header = lines[first]
    if "\t" not in header and "," not in header:  # whitespace separated (IAPS technical manual)
        rows = [(i + 1, line.split()) for i, line in enumerate(lines) if line.strip()]
    else:
        rows = list(_csv_rows(lines, "\t" if "\t" in header else ",", path, quarantine))
    if not rows:
        raise DatasetError(f"{path}: no readable header row")
    names = [h.strip() for h in rows[0][1]]
    _check_header(path, names, required)
    out = []
    for line, cells in rows[1:]:
        where = f"{path}:{line}"
        if len(cells) != len(names):
            quarantine.append(quarantine_row(where, "record", "malformed_record",
                                             f"{where}: {len(cells)} fields, the header has {len(names)}"))
            continue
        out.append((where, dict(zip(names, [c.strip() for c in cells]))))
    return out


def _csv_rows(lines: list[str], delimiter: str, path: str, quarantine: list[dict]):
    """(first line number, cells) of non-blank CSV records; broken ones quarantined."""
    position = {"line": 0}

    def numbered():
        for line in lines:
            position["line"] += 1
            yield line

    reader = csv.reader(numbered(), delimiter=delimiter, strict=True)
    while True:
        start = position["line"] + 1
        try:
            cells = next(reader)
        except StopIteration:
            return
        except csv.Error as err:
            where = f"{path}:{start}"
            quarantine.append(quarantine_row(where, "record", "malformed_record", f"{where}: {err}"))
            continue
        if any(c.strip() for c in cells):
            yield start, cells


def _check_header(path: str, names: list[str], required: Sequence[Sequence[str]]) -> None:
    """:class:`DatasetError` when the header ``names`` of table ``path`` lacks a ``required``
    column (any of its spellings, case-insensitive)."""
    have = {n.lower() for n in names}
    missing = [spellings for spellings in required if not have & {s.lower() for s in spellings}]
    if missing:
        said = "; ".join(f"no column {' or '.join(map(repr, spellings))}" for spellings in missing)
        expected = ", ".join("/".join(spellings) for spellings in required)
        raise DatasetError(f"{path}: {said} (columns found: {', '.join(names) or 'none'}; expected {expected}; "
                           f"rename the column in the file, no setting maps column names)")


class _RowFault(Exception):
    """One annotation row is bad: quarantined with its place, field and reason."""

    def __init__(self, where: str, field_name: str, reason: str, detail: str):
        super().__init__(f"{where}: {detail}")
        self.where, self.field, self.reason = where, field_name, reason

    def quarantine(self) -> dict:
        return quarantine_row(self.where, self.field, self.reason, str(self))


def _missing(where: str, field_name: str, empty: bool = False) -> _RowFault:
    said = f"field {field_name!r} is empty" if empty else f"missing field {field_name!r}"
    return _RowFault(where, field_name, "missing_field", said)


def _column(row: dict, names: Sequence[str], where: str) -> str:
    """The first present, non-empty column among ``names`` (case-insensitive); missing_field when
    none has a value (the detail says whether the column is absent or its cell empty)."""
    lowered = {k.lower(): v for k, v in row.items() if k is not None}
    for name in names:
        value = lowered.get(name.lower())
        if value not in (None, ""):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise _RowFault(where, name, "undecodable_text", f"field {name!r} is not UTF-8: {value!r}") from None
            return value
    present = next((n for n in names if n.lower() in lowered), None)  # a present column with an empty cell
    raise _missing(where, present or names[0], empty=present is not None)


def _first_existing(root: str, candidates: Sequence[str]) -> str | None:
    for candidate in candidates:
        path = os.path.join(root, candidate)
        if os.path.isfile(path):
            return path
    return None


def _load_webemo_hierarchy(root: str) -> dict[str, tuple[str, str]]:
    path = os.path.join(root, "hierarchy.csv")
    if not os.path.isfile(path):
        return dict(WEBEMO_HIERARCHY)
    mapping = {}
    problems: list[dict] = []
    for where, row in _read_table(path, problems, [["level3"], ["level2"], ["level1"]]):
        try:
            mapping[_column(row, ["level3"], where).lower()] = (
                _column(row, ["level2"], where).lower(), _column(row, ["level1"], where).lower()
            )
        except _RowFault as err:
            raise DatasetError(str(err)) from None
    if problems:  # the hierarchy defines the label space: a bad row is an error, not a quarantine
        raise DatasetError(problems[0]["detail"])
    return mapping


def read_webemo(root: str, seed: int = 0, limit: int = 0) -> TaskData:
    """WebEmo, three levels predicted together (see the module docstring for both layouts)."""
    root = _require_dir(root, "webemo")
    quarantine: list[dict] = []
    if os.path.isfile(os.path.join(root, "train.csv")):
        records, label_names = _webemo_csv_records(root, quarantine)
    elif os.path.isfile(os.path.join(root, "train25.txt")):
        records, label_names = _webemo_txt_records(root, quarantine)
    else:
        raise DatasetError(f"webemo: expected {root}/train.csv (+ test.csv) or {root}/train25.txt (+ test25.txt)")
    if not records:
        raise DatasetError(f"webemo: no usable rows under {root}")
    return _build("webemo", "hierarchical", label_names, records, quarantine, seed, limit)


def webemo_levels(data: TaskData) -> dict[str, TaskData]:
    """Hierarchical WebEmo -> one single-label task per level (:data:`WEBEMO_LEVELS` name -> data;
    targets int64 [N] into that level's ``label_names``), for Table 2, where each level is trained
    and tested on its own (paper 4.5.1). Same images, split and quarantine as ``data``.

    The levels keep ``data``'s split fingerprints: each level's targets are a function of the
    hierarchy's, so the fingerprint still identifies the content, and the three levels (and the
    hierarchical task on the same root) share one frozen-feature extraction. Cached results still
    tell them apart, by task kind and label names (:mod:`pacl_ray.evaluation.evaluate`)."""
    if data.kind != "hierarchical" or len(data.label_names) != len(WEBEMO_LEVELS):
        raise DatasetError(f"{data.name}: per-level tasks need hierarchical data with {len(WEBEMO_LEVELS)} levels, "
                           f"got {data.kind} with {len(data.label_names)}")
    out = {}
    for name, level in WEBEMO_LEVELS.items():
        splits = {k: Split(v.paths, np.ascontiguousarray(v.targets[:, level]), v.sources)
                  for k, v in data.splits.items()}
        out[name] = TaskData(name=name, kind="single", label_names=[list(data.label_names[level])], splits=splits,
                             quarantine=data.quarantine, fingerprints=dict(data.fingerprints))
    return out


def read_webemo_level(root: str, level: str, seed: int = 0, limit: int = 0) -> TaskData:
    """One WebEmo level as a single-label task (``level`` a :data:`WEBEMO_LEVELS` name)."""
    return webemo_levels(read_webemo(root, seed=seed, limit=limit))[level]


def _webemo_csv_records(root: str, quarantine: list[dict]) -> tuple[list[_Record], list[list[str]]]:
    rows_by_split = {}
    for split in SPLITS:
        path = os.path.join(root, f"{split}.csv")
        if os.path.isfile(path):
            rows_by_split[split] = (path, _read_table(path, quarantine, WEBEMO_CSV_COLUMNS))
    if "test" not in rows_by_split:
        raise DatasetError(f"webemo: {root}/train.csv given but {root}/test.csv is missing")
    levels: list[set] = [set(), set(), set()]
    parsed = []
    for split, (path, rows) in rows_by_split.items():
        for where, row in rows:
            try:
                image = _column(row, ["image", "path"], where)
                labels = [_column(row, [f"level{k}"], where) for k in (1, 2, 3)]
            except _RowFault as err:
                quarantine.append(err.quarantine())
                continue
            for level, label in zip(levels, labels):
                level.add(label)
            parsed.append((os.path.join(root, image), labels, where, split))
    names = [sorted(level) for level in levels]
    index = [{n: i for i, n in enumerate(level)} for level in names]
    records = [_Record(p, [index[k][l] for k, l in enumerate(labels)], w, s) for p, labels, w, s in parsed]
    return records, names


def _webemo_txt_records(root: str, quarantine: list[dict]) -> tuple[list[_Record], list[list[str]]]:
    hierarchy = _load_webemo_hierarchy(root)
    fine = sorted(hierarchy)
    level2 = sorted({v[0] for v in hierarchy.values()})
    level1 = sorted({v[1] for v in hierarchy.values()})
    records = []
    for split, filename in (("train", "train25.txt"), ("val", "val25.txt"), ("test", "test25.txt")):
        path = os.path.join(root, filename)
        if not os.path.isfile(path):
            if split == "test":
                raise DatasetError(f"webemo: {path} is missing")
            continue
        with open(path, "rb") as handle:
            for i, raw in enumerate(handle, start=1):
                where = f"{path}:{i}"
                try:
                    line = raw.decode("utf-8-sig" if i == 1 else "utf-8")
                except UnicodeDecodeError as err:
                    quarantine.append(quarantine_row(where, "image", "undecodable_text", f"{where}: not UTF-8 ({err})"))
                    continue
                parts = line.split()
                if not parts:
                    continue
                if len(parts) < 2:
                    quarantine.append(quarantine_row(where, "label", "missing_field", "expected '<url-or-path> <label>'"))
                    continue
                try:
                    label = int(parts[-1])
                    if not 0 <= label < len(fine):
                        raise ValueError(f"label {label} outside 0..{len(fine) - 1}")
                except ValueError as err:
                    quarantine.append(quarantine_row(where, "label", "bad_value", str(err)))
                    continue
                ref = parts[0]
                image = os.path.join(root, "images", ref.rstrip("/").rsplit("/", 1)[-1]) if "://" in ref else os.path.join(root, ref)
                name = fine[label]
                second, first = hierarchy[name]
                records.append(_Record(image, [level1.index(first), level2.index(second), label], where, split))
    return records, [level1, level2, fine]


def _emotic_tables(root: str) -> dict[str, str]:
    for sub in ("", "annotations", "emotic_pre"):
        base = os.path.join(root, sub) if sub else root
        found = {s: os.path.join(base, f"{s}.csv") for s in SPLITS if os.path.isfile(os.path.join(base, f"{s}.csv"))}
        if found:
            return found
    raise DatasetError(f"emotic: no {{train,val,test}}.csv under {root} (or its annotations/, emotic_pre/)")


def _parse_list(text: str, where: str, field_name: str, item: type = str) -> list:
    """A list literal cell (``"['Engagement', 'Happiness']"``, ``"[6, 5, 7]"``) whose items are all
    ``item`` (str: category names; float: numbers, integers included); a lone value counts as a
    one-item list. A cell that is not a literal is bad_value, a literal of another type (an
    object, a number among category names, a name among numbers, a boolean) wrong_type. An empty
    list ``[]`` counts as an empty cell (missing_field), like the conversion scripts' blank cells."""
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError) as err:
        raise _RowFault(where, field_name, "bad_value", f"field {field_name!r} is not a list literal: {text!r} ({err})") from None
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        value = [value]
    expected = "a list of category names (strings)" if item is str else "a list of numbers"
    if not isinstance(value, (list, tuple)):
        raise _RowFault(where, field_name, "wrong_type", f"field {field_name!r} is a {type(value).__name__} "
                                                         f"{text!r}; expected {expected}")
    if not value:
        raise _RowFault(where, field_name, "missing_field", f"field {field_name!r} is an empty list {text!r}")
    for v in value:
        ok = isinstance(v, str) if item is str else isinstance(v, (int, float)) and not isinstance(v, bool)
        if not ok:
            raise _RowFault(where, field_name, "wrong_type", f"field {field_name!r} holds {type(v).__name__} "
                                                             f"{v!r}; expected {expected}")
    return list(value)


def read_emotic(root: str, kind: str = "multilabel", seed: int = 0, limit: int = 0) -> TaskData:
    """Emotic, whole image: ``kind="multilabel"`` (26 categories) or ``"vad"`` (continuous VAD)."""
    if kind not in ("multilabel", "vad"):
        raise DatasetError(f"emotic: kind must be multilabel or vad, got {kind!r}")
    root = _require_dir(root, "emotic")
    lookup = {c.lower(): i for i, c in enumerate(EMOTIC_CATEGORIES)}
    quarantine: list[dict] = []
    merged: dict[tuple[str, str], dict] = {}  # (split, image) -> categories, vad list, source
    for split, path in _emotic_tables(root).items():
        labels_column = "Categorical_Labels" if kind == "multilabel" else "Continuous_Labels"
        for where, row in _read_table(path, quarantine, [["Folder"], ["Filename"], [labels_column]]):
            try:
                image = os.path.join(root, _column(row, ["Folder"], where), _column(row, ["Filename"], where))
                if kind == "multilabel":
                    names = _parse_list(_column(row, ["Categorical_Labels"], where), where, "Categorical_Labels")
                    unknown = [n for n in names if n.lower() not in lookup]
                    if unknown:
                        raise ValueError(f"{where}: field 'Categorical_Labels' has unknown categories {unknown}")
                    value = [lookup[n.lower()] for n in names]
                else:
                    value = [float(v) for v in _parse_list(_column(row, ["Continuous_Labels"], where), where,
                                                           "Continuous_Labels", float)]
                    if len(value) != 3:
                        raise ValueError(f"{where}: field 'Continuous_Labels' needs 3 values, got {value}")
            except _RowFault as err:
                quarantine.append(err.quarantine())
                continue
            except (ValueError, TypeError) as err:
                quarantine.append(quarantine_row(where, "labels", "bad_value", str(err)))
                continue
            entry = merged.setdefault((split, image), {"values": [], "source": where})
            entry["values"].append(value)
    records = []
    for (split, image), entry in merged.items():
        if kind == "multilabel":
            target = np.zeros(len(EMOTIC_CATEGORIES), dtype=np.float32)
            for cats in entry["values"]:
                target[cats] = 1.0
        else:
            target = np.mean(np.asarray(entry["values"], dtype=np.float32), axis=0) / 10.0
        records.append(_Record(image, target, entry["source"], split))
    if not records:
        raise DatasetError(f"emotic: no usable rows under {root}")
    label_names = [list(EMOTIC_CATEGORIES)] if kind == "multilabel" else [list(VAD_NAMES)]
    return _build("emotic", kind, label_names, records, quarantine, seed, limit)


def _iaps_table(root: str) -> str:
    found = _first_existing(root, ["ratings.csv", "ratings.tsv", "ratings.txt"])
    if found:
        return found
    candidates = sorted(f for f in os.listdir(root) if f.lower().startswith("allsubjects") and f.lower().endswith(".txt"))
    if candidates:
        return os.path.join(root, candidates[0])
    raise DatasetError(f"iaps: no ratings table under {root} (ratings.csv/.tsv/.txt or AllSubjects*.txt)")


def _find_image(directories: Sequence[str], stem: str) -> str:
    """The image named ``stem`` with any image extension, else the .jpg path (reported missing)."""
    for directory in directories:
        for ext in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
            path = os.path.join(directory, stem + ext)
            if os.path.isfile(path):
                return path
    return os.path.join(directories[0], stem + ".jpg")


def read_iaps(root: str, seed: int = 0, limit: int = 0) -> TaskData:
    """IAPS VAD ratings (1-9, scaled to [0, 1]); seeded 8:1:1 split."""
    root = _require_dir(root, "iaps")
    table = _iaps_table(root)
    image_dirs = [os.path.join(root, "images"), root] if os.path.isdir(os.path.join(root, "images")) else [root]
    quarantine: list[dict] = []
    records = []
    seen = set()
    for where, row in _read_table(table, quarantine, IAPS_COLUMNS):
        try:
            number = _column(row, ["IAPS"], where)
            vad = [float(_column(row, names, where)) for names in IAPS_COLUMNS[1:]]
        except _RowFault as err:
            quarantine.append(err.quarantine())
            continue
        except ValueError as err:
            quarantine.append(quarantine_row(where, "ratings", "bad_value", f"{where}: {err}"))
            continue
        if number in seen:
            quarantine.append(quarantine_row(where, "IAPS", "duplicate_id", f"{where}: picture {number} listed twice", number))
            continue
        seen.add(number)
        records.append(_Record(_find_image(image_dirs, number), np.asarray(vad, dtype=np.float32) / 9.0, where))
    if not records:
        raise DatasetError(f"iaps: no usable rows in {table}")
    return _build("iaps", "vad", [list(VAD_NAMES)], records, quarantine, seed, limit)


# --------------------------------------------------------------------------- registry

# (kind, dataset) -> reader(root, seed, limit). "imagefolder" is handled by load_dataset.
READERS: dict[tuple[str, str], Callable[..., TaskData]] = {
    ("single", "fi"): read_fi,
    ("single", "fi2"): read_fi2,
    ("single", "emotion6"): read_emotion6,
    ("single", "unbiasedemo"): read_unbiasedemo,
    ("hierarchical", "webemo"): read_webemo,
    **{("single", level): (lambda root, seed=0, limit=0, level=level: read_webemo_level(root, level, seed, limit))
       for level in WEBEMO_LEVELS},
    ("multilabel", "emotic"): lambda root, seed=0, limit=0: read_emotic(root, "multilabel", seed, limit),
    ("vad", "emotic"): lambda root, seed=0, limit=0: read_emotic(root, "vad", seed, limit),
    ("vad", "iaps"): read_iaps,
}
DISPLAY_NAMES = {
    "fi": "FI", "fi2": "FI-2", "emotion6": "Emotion-6", "unbiasedemo": "UnbiasedEmo", "webemo": "WebEmo",
    "emotic": "Emotic", "iaps": "IAPS", "webemo2": "WebEmo-2", "webemo7": "WebEmo-7", "webemo25": "WebEmo-25",
}


def load_dataset(kind: str, dataset: str, root: str, seed: int = 0, limit: int = 0) -> TaskData:
    """Read and validate a dataset. ``kind="imagefolder"`` reads the generic layout under any name."""
    if kind == "imagefolder":
        return read_imagefolder(root, name=dataset, seed=seed, limit=limit)
    reader = READERS.get((kind, dataset))
    if reader is None:
        known = ", ".join(f"{k}:{d}" for k, d in READERS) + ", imagefolder:<any name>"
        raise DatasetError(f"no reader for {kind}:{dataset}; known: {known}")
    return reader(root, seed=seed, limit=limit)
