"""What every image source shares: the sample reference, the source protocol, and the split rules (official
splits by name, or the paper's seeded stratified 70/10/20 split)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Protocol, Sequence

import numpy as np
from PIL import Image

from fpt import FptError
from fpt.store import SPLITS

SPLIT_FOLDS = 10    # the paper's 70/10/20 rule as ten stratified folds: 7 train, 1 val, 2 test


@dataclass(frozen=True)
class SampleRef:
    id: str        # relative path (or generated id)
    label: int     # index into the source's classes
    split: int     # index into SPLITS


class ImageSource(Protocol):
    name: str
    classes: list[str]
    samples: list[SampleRef]

    def load(self, ref: SampleRef) -> Image.Image: ...


def unreadable_source_error(message: str) -> FptError:
    """The refusal of an unreadable source (``--on-error fail``): ``load``'s message and how to skip instead."""
    return FptError(f"{message} (pass --on-error skip to skip unreadable files)")


def class_names(labels: Sequence[str], fixed: list[str] | None, what: str) -> list[str]:
    """The class list: ``fixed`` (the pipeline's order) when given, else the sorted distinct ``labels``."""
    if fixed is None:
        check_distinct_classes(sorted(set(labels)), what)
        return sorted(set(labels))
    unknown = sorted(set(labels) - set(fixed))
    if unknown:
        raise FptError(f"{what}: label(s) {', '.join(map(repr, unknown[:5]))} are not among the pipeline's "
                       f"classes {fixed}")
    return list(fixed)


def check_distinct_classes(names: Sequence[str], what: str) -> None:
    """Refuse fewer than two classes (nothing to classify), and class names that differ only in case or
    surrounding spaces (``Benign`` / ``benign``): almost always one class spelt two ways, which would silently
    split it in two."""
    if len(set(names)) < 2:
        raise FptError(f"{what}: {len(set(names))} class{'' if len(set(names)) == 1 else 'es'} "
                       f"({', '.join(map(repr, sorted(set(names))))}); a classifier needs at least two")
    seen: dict[str, str] = {}
    for name in names:
        other = seen.setdefault(name.strip().casefold(), name)
        if other != name:
            raise FptError(f"{what}: classes {other!r} and {name!r} differ only in case or spaces; spell each "
                           "class one way (they would be two classes)")


def check_class_coverage(samples: Sequence[SampleRef], classes: Sequence[str], what: str) -> list[str]:
    """Refuse a class without training samples (it cannot be learnt); return a warning for every class missing
    from val or test (their AUC is undefined: val AUC cannot pick the best epoch, test AUC cannot be reported)."""
    present = {(s.split, s.label) for s in samples}
    train = SPLITS.index("train")
    untrained = [c for i, c in enumerate(classes) if (train, i) not in present]
    if untrained:
        raise FptError(f"{what}: class(es) {', '.join(map(repr, untrained))} have no train samples, so they cannot "
                       "be learnt; add train images for them or remove them (e.g. an empty class folder)")
    warnings = []
    for s, split in enumerate(SPLITS):
        missing = [c for i, c in enumerate(classes) if (s, i) not in present]
        if missing and split != "train":
            warnings.append(f"{what}: class(es) {', '.join(map(repr, missing))} have no {split} samples, so {split} "
                            f"AUC is undefined{' and the best epoch cannot be chosen by it' if split == 'val' else ''}"
                            "; move some of their images there (or let fpt split a CSV without a split column)")
    return warnings


def check_files_exist(paths: Sequence[str], root: Path, what: str) -> None:
    missing = [p for p in paths if not (root / p).is_file()]          # one look at each path
    folders = [p for p in missing if (root / p).is_dir()]
    if folders:
        raise FptError(f"{what}: {len(folders)} of {len(paths)} paths are folders, not image files (relative to "
                       f"{root}), e.g. {', '.join(folders[:3])}")
    if missing:
        raise FptError(f"{what}: {len(missing)} of {len(paths)} image files are missing (relative to {root}), "
                       f"e.g. {', '.join(missing[:3])}")


def parse_split_names(names: Sequence[str], what: str) -> list[int]:
    """``train``/``val``/``test`` (any case) -> split indices."""
    unknown = sorted({n for n in names if n.lower() not in SPLITS})
    if unknown:
        raise FptError(f"{what}: unknown split name(s) {', '.join(map(repr, unknown[:5]))}; use train, val or test")
    return [SPLITS.index(n.lower()) for n in names]


def stratified_group_split(labels: Sequence[int], groups: Sequence[str], seed: int, what: str) -> np.ndarray:
    """The paper's rule for datasets without an official split: seeded, stratified 70/10/20 train/val/test.

    labels, groups: [n]; every group (patient) lands in one split. Returns uint8 [n] indices into SPLITS.
    scikit-learn's StratifiedGroupKFold (shuffled by ``seed``) makes ten folds: 0-6 train, 7 val, 8-9 test.
    The same inputs in the same order always give the same split.
    """
    from sklearn.model_selection import StratifiedGroupKFold   # ~2 s to import: only when a split is made

    labels, groups = np.asarray(labels), np.asarray(groups)
    n_groups, smallest = len(np.unique(groups)), int(np.unique(labels, return_counts=True)[1].min())
    if n_groups < SPLIT_FOLDS or smallest < SPLIT_FOLDS:
        raise FptError(f"{what}: a stratified 70/10/20 split needs at least {SPLIT_FOLDS} groups and "
                       f"{SPLIT_FOLDS} samples of every class; found {n_groups} groups and {smallest} samples "
                       "in the smallest class")
    folds = np.empty(len(labels), dtype=np.int64)
    splitter = StratifiedGroupKFold(n_splits=SPLIT_FOLDS, shuffle=True, random_state=seed)
    for fold, (_, members) in enumerate(splitter.split(np.zeros(len(labels)), labels, groups)):
        folds[members] = fold
    return np.digitize(folds, [7, 8]).astype(np.uint8)


def check_each_image_once(files: Iterable[tuple[str, Path]], where: str) -> None:
    """Refuse a data set that lists one image file twice, however each reaches it (``./a.png``, ``sub/../a.png``,
    an absolute path, a link to the other): it would be trained on twice, or leak between splits. ``files``: (the
    sample as the user knows it, its path). A file is known by its device and inode (one ``stat``, ~10x cheaper
    than resolving the path); a missing one is ``check_files_exist``'s to name."""
    first: dict[tuple[int, int], str] = {}
    for name, path in files:
        try:
            st = path.stat()
        except OSError:
            continue
        seen = first.setdefault((st.st_dev, st.st_ino), name)
        if seen != name:
            raise FptError(f"{where}: {seen} and {name} are the same image file {path.name!r} (listed twice, it "
                           "would be trained on twice or leak between splits)")


def check_splits_filled(samples: Sequence[SampleRef], what: str) -> None:
    present = {s.split for s in samples}
    for s, split in enumerate(SPLITS):
        if s not in present:
            raise FptError(f"{what}: the {split} split is empty")
