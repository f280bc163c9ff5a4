"""Extract -> train -> evaluate on a tiny store; determinism; checkpoint/store mismatch."""
import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fpt import FptError
from fpt.extract import extract
from fpt.store import StoreReader
from fpt.train import classification_metrics, evaluate_checkpoint, train
from tests.conftest import micro_config
from tests.helpers import tiny_train


def test_extract_writes_a_complete_store_matching_the_data(micro_store, image_folder):
    r = StoreReader(micro_store)
    r.require_complete()
    g = r.geometry
    assert (g.n_samples, g.layers, g.heads, g.k, g.head_dim) == (16, 2, 2, 13, 16)   # layers 2-3 of 4; floor(65 * 0.2)
    assert r.attrs["extraction"]["layers"] == [2, 3] and r.attrs["backbone"]["random_init"] is True
    assert r.ids[0] == "train/benign/000.png" and r.classes == ["benign", "malignant"]
    assert r.attrs["dataset"]["counts"]["val"] == {"benign": 2, "malignant": 2}
    batch = r.read([0], ("images",))
    assert batch["images"].shape == (1, 32, 32, 3)


def test_rerun_on_finished_store_does_nothing(micro_store, image_folder):
    before = {p: p.stat().st_mtime_ns for p in micro_store.rglob("*") if p.is_file()}
    result = extract(micro_config(image_folder, micro_store))
    assert result.n_written == 0
    assert before == {p: p.stat().st_mtime_ns for p in micro_store.rglob("*") if p.is_file()}


def test_mismatched_rerun_is_refused_unless_overwrite(micro_store, image_folder):
    with pytest.raises(FptError, match=r"different extraction \(extraction\.token_ratio: stored 0.2, requested 0.5"):
        extract(micro_config(image_folder, micro_store, token_ratio=0.5))
    assert extract(micro_config(image_folder, micro_store, token_ratio=0.5, overwrite=True)).n_written == 16
    assert StoreReader(micro_store).geometry.k == 32


def test_train_writes_metrics_checkpoint_and_log(micro_store, tmp_path):
    metrics = train(tiny_train(micro_store, tmp_path / "run"))
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["test"].keys() >= {"auc", "acc", "f1", "kappa", "precision", "recall"}
    assert saved["best_epoch"] in (0, 1) and saved["method"] == "fpt+"
    p = saved["params"]
    assert p["total"] == p["learnable"] + StoreReader(micro_store).attrs["backbone"]["published_params"]
    assert p["ratio_percent"] == pytest.approx(100 * p["learnable"] / p["total"])
    assert saved["config"]["prompts"] == 3
    assert len((tmp_path / "run" / "log.jsonl").read_text().splitlines()) == 2
    again = evaluate_checkpoint(micro_store, tmp_path / "run" / "best.pt", "test", device="cpu")
    assert again.metrics["auc"] == pytest.approx(metrics.test["auc"])


def test_training_is_deterministic_for_a_seed(micro_store, tmp_path):
    a = train(tiny_train(micro_store, tmp_path / "a"))
    b = train(tiny_train(micro_store, tmp_path / "b"))
    train(tiny_train(micro_store, tmp_path / "c", seed=1))
    assert a.test == b.test and a.val == b.val
    wa = torch.load(tmp_path / "a" / "best.pt", weights_only=True)["model"]
    wb = torch.load(tmp_path / "b" / "best.pt", weights_only=True)["model"]
    wc = torch.load(tmp_path / "c" / "best.pt", weights_only=True)["model"]
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert not all(torch.equal(wa[k], wc[k]) for k in wa)


def test_checkpoint_from_another_store_is_refused(micro_store, image_folder, tmp_path):
    train(tiny_train(micro_store, tmp_path / "run", epochs=1))
    other = tmp_path / "other.zarr"
    extract(micro_config(image_folder, other, layers=[1, 3]))
    with pytest.raises(FptError, match="trained on another store"):
        evaluate_checkpoint(other, tmp_path / "run" / "best.pt")
    for junk in (b"junk", b'{"zarr_format": 3}', pickle.dumps(Path("x"))):    # not torch's; a pickle unsafe to load
        (tmp_path / "junk.pt").write_bytes(junk)
        with pytest.raises(FptError, match="not an fpt checkpoint") as refused:
            evaluate_checkpoint(micro_store, tmp_path / "junk.pt")
        assert len(str(refused.value)) < 250 and "weights_only" not in str(refused.value)


def test_bad_train_options_fail_before_work(micro_store, tmp_path):
    with pytest.raises(FptError, match="not a multiple of the patch size"):
        train(tiny_train(micro_store, tmp_path / "r", side_res=12))
    with pytest.raises(FptError, match="--prompts -1"):
        tiny_train(micro_store, tmp_path / "r", prompts=-1)
    assert not (tmp_path / "r").exists()


def test_metrics_follow_sklearn_conventions():
    labels = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.4, 0.6], [0.35, 0.65], [0.2, 0.8]])
    m = classification_metrics(labels, probs)
    assert m["auc"] == pytest.approx(1.0) and m["acc"] == pytest.approx(0.75)
    assert classification_metrics(np.array([1, 1]), np.array([[0.2, 0.8], [0.3, 0.7]]))["auc"] is None


@pytest.mark.parametrize("n_classes", [2, 3, 5])
def test_metrics_equal_their_definitions_written_out(n_classes):
    """AUC as the share of (positive, negative) pairs ranked right (ties count half; one-vs-rest, averaged over
    classes, for more than two), accuracy, F1/precision/recall from the confusion counts (of the positive class
    for two classes, averaged over classes otherwise) and quadratic-weighted kappa from its formula."""
    rng = np.random.default_rng(n_classes)
    labels = np.repeat(np.arange(n_classes), [8 * (c + 1) for c in range(n_classes)])     # unequal classes
    p = rng.dirichlet(np.ones(n_classes), len(labels)) + 0.3 * np.eye(n_classes)[labels]
    probs = np.array([rng.multinomial(20, row / row.sum()) for row in p]) / 20    # in 20ths: ties among scores
    m, preds = classification_metrics(labels, probs), probs.argmax(1)

    def auc(scores, positive):
        pos, neg = scores[positive][:, None], scores[~positive][None, :]
        return ((pos > neg) + 0.5 * (pos == neg)).mean()

    classes = [1] if n_classes == 2 else range(n_classes)
    assert m["auc"] == pytest.approx(np.mean([auc(probs[:, c], labels == c) for c in classes]))
    assert m["acc"] == pytest.approx((preds == labels).mean())
    tp = np.array([((preds == c) & (labels == c)).sum() for c in classes], dtype=float)
    precision = tp / np.array([(preds == c).sum() for c in classes])
    recall = tp / np.array([(labels == c).sum() for c in classes])
    f1 = 2 * precision * recall / (precision + recall)
    assert (m["precision"], m["recall"], m["f1"]) == pytest.approx((precision.mean(), recall.mean(), f1.mean()))
    observed = np.zeros((n_classes, n_classes))
    np.add.at(observed, (labels, preds), 1)
    expected = np.outer(observed.sum(1), observed.sum(0)) / len(labels)
    weights = (np.arange(n_classes)[:, None] - np.arange(n_classes)[None, :]) ** 2
    assert m["kappa"] == pytest.approx(1 - (weights * observed).sum() / (weights * expected).sum())


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_precision_recall_and_f1_are_sklearns_own_scores(classes):
    """One precision_recall_fscore_support call gives what f1_score, precision_score and recall_score give, also
    where a class is never predicted (zero_division=0)."""
    from sklearn.metrics import f1_score, precision_score, recall_score

    rng = np.random.default_rng(classes)
    average = "binary" if classes == 2 else "macro"
    for n in (7, 50, 400):
        labels = rng.integers(0, classes, n)
        probs = rng.random((n, classes)) ** 3
        probs[:, 0] *= 0.1 if n == 7 else 1.0                   # class 0 (almost) never predicted
        probs /= probs.sum(1, keepdims=True)
        preds, m = probs.argmax(1), classification_metrics(labels, probs)
        for name, score in (("f1", f1_score), ("precision", precision_score), ("recall", recall_score)):
            assert m[name] == score(labels, preds, average=average, zero_division=0), (name, n)


@pytest.mark.parametrize("mode", ["L", "LA", "1"])
def test_eight_bit_grey_is_prepared_as_its_rgb_conversion_would_be(mode):
    """Grey stays one channel through the resizes (a third of the work) and in the LPM input, and gives exactly the
    pixels of converting to RGB first: LPM input and low-res copy, resized up, down, not at all and from a
    non-square."""
    from PIL import Image

    from fpt.extract import prepare_image
    from fpt.extract.images import to_supported_mode

    rng = np.random.default_rng(0)
    for shape in [(64, 64), (50, 70), (130, 97), (16, 16)]:
        grey = Image.fromarray(rng.integers(0, 256, shape, dtype=np.uint8))
        im = grey.convert(mode)
        assert to_supported_mode(im).mode == "L"
        for res, image_res in [(64, 16), (32, 48), (16, 16)]:
            high, low = prepare_image(to_supported_mode(im), res, image_res)
            want_high, want_low = prepare_image(im.convert("RGB"), res, image_res)
            assert high.dtype == want_high.dtype and low.dtype == want_low.dtype and high.shape[-1] == 1
            np.testing.assert_array_equal(np.repeat(high, 3, -1), want_high)
            np.testing.assert_array_equal(low, want_low)


@pytest.mark.parametrize("mode, suffix", [(m, ".png") for m in ("RGB", "RGBA", "P", "L", "LA", "1", "I;16")]
                         + [("RGB", ".jpg"), ("L", ".jpg")])
@pytest.mark.parametrize("orientation", [None, 6])
def test_image_files_load_as_their_straightforward_reading(tmp_path, mode, suffix, orientation):
    """``load_image_file`` skips the copies of an already-RGB or -grey image (decoding, orienting and converting in
    place): the pixels and mode are those of opening, applying the EXIF orientation and converting; the result
    stays usable after its file is gone."""
    from PIL import Image, ImageOps

    from fpt.extract.images import load_image_file, to_supported_mode

    rng = np.random.default_rng(1)
    base = Image.fromarray(rng.integers(0, 256, (24, 40, 3), dtype=np.uint8))
    im = (Image.fromarray(rng.integers(0, 4096, (24, 40), dtype=np.uint16)) if mode == "I;16"
          else base.convert(mode))
    path = tmp_path / f"image{suffix}"
    exif = Image.Exif()
    if orientation:
        exif[0x0112] = orientation                        # rotated 90 degrees: width and height swap
    im.save(path, exif=exif)

    want = to_supported_mode(ImageOps.exif_transpose(Image.open(path)))
    got = load_image_file(path)
    path.unlink()
    assert got.mode == want.mode and got.size == want.size == ((24, 40) if orientation else (40, 24))
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


@pytest.mark.parametrize("order", ["<", ">"])
def test_sixteen_bit_tiffs_of_either_byte_order_keep_their_full_range(tmp_path, order):
    """A 16-bit grey TIFF opens as "I;16" (little-endian) or "I;16B" (big-endian, e.g. from some scanners); both
    are high-bit-depth grey and load as the float image of their values min-max scaled (``grey_float``), never
    as an 8-bit conversion that clips every value above 255 to white."""
    from PIL import Image

    from fpt.extract.images import grey_float, load_image_file

    stored = np.random.default_rng(2).integers(100, 60_000, (24, 40)).astype(f"{order}u2")
    mode = "I;16B" if order == ">" else "I;16"
    Image.frombuffer(mode, (40, 24), stored.tobytes(), "raw", mode, 0, 1).save(tmp_path / "scan.tif")
    assert Image.open(tmp_path / "scan.tif").mode == mode
    got = load_image_file(tmp_path / "scan.tif")
    assert got.mode == "F"
    np.testing.assert_array_equal(np.asarray(got), np.asarray(grey_float(stored.astype("=u2"))))


@pytest.mark.parametrize("res, image_res", [(64, 16), (48, 16), (64, 64), (50, 20), (16, 24)])
def test_low_res_copy_is_the_area_mean_rounded_once(res, image_res):
    """``low_res_copy`` against a plain reference: for a res that is a multiple of image_res every pixel is the
    mean of its block, rounded to 8 bits once (half to even); otherwise torch's area pooling (each pixel the mean
    of the pixels it covers) or, upward, bicubic. Grey gives the RGB conversion's copy, float input its rounding."""
    import torch.nn.functional as F

    from fpt.extract.images import low_res_copy

    rng = np.random.default_rng(res + image_res)
    rgb = torch.from_numpy(rng.integers(0, 256, (2, res, res, 3), dtype=np.uint8))
    low = low_res_copy(rgb, image_res)
    assert low.dtype == torch.uint8 and low.shape == (2, image_res, image_res, 3)
    x = rgb.numpy().astype(np.float64)
    if res % image_res == 0:
        f = res // image_res
        want = np.round(x.reshape(2, image_res, f, image_res, f, 3).mean(axis=(2, 4)))
    elif image_res < res:                    # adaptive bins: [floor(i * res / R), ceil((i + 1) * res / R))
        edges = [(i * res // image_res, -(-(i + 1) * res // image_res)) for i in range(image_res)]
        want = np.round(np.array([[x[:, a:b, c:d].mean(axis=(1, 2)) for c, d in edges] for a, b in edges]))
        want = want.transpose(2, 0, 1, 3)
    else:
        want = F.interpolate(rgb.permute(0, 3, 1, 2).double(), size=(image_res, image_res), mode="bicubic",
                             align_corners=False).round().clamp(0, 255).permute(0, 2, 3, 1).numpy()
    np.testing.assert_array_equal(low.numpy(), want)
    grey = rgb[..., :1]
    np.testing.assert_array_equal(low_res_copy(grey, image_res), low_res_copy(grey.expand(-1, -1, -1, 3), image_res))
    np.testing.assert_array_equal(low_res_copy(rgb.float(), image_res), low)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_low_res_copy_on_the_gpu_equals_the_cpus():
    from fpt.extract.images import low_res_copy

    rgb = torch.from_numpy(np.random.default_rng(0).integers(0, 256, (4, 512, 512, 3), dtype=np.uint8))
    for image_res in (256, 128):
        np.testing.assert_array_equal(low_res_copy(rgb.cuda(), image_res).cpu(), low_res_copy(rgb, image_res))


def test_sixteen_bit_grey_keeps_precision_until_the_resize():
    from PIL import Image

    from fpt.extract import prepare_image
    from fpt.extract.images import to_supported_mode

    ramp = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 16)     # 12 bits of distinct levels
    im = to_supported_mode(Image.fromarray(ramp))
    assert im.mode == "F"
    high, low = prepare_image(im, 64, 16)
    assert high.dtype == np.float32 and high.shape == (64, 64, 1)
    assert len(np.unique(high[..., 0])) > 256                              # more levels than 8 bits can hold
    np.testing.assert_allclose(high[..., 0], ramp / ramp.max() * 255, rtol=1e-5, atol=1e-3)
    assert low.dtype == np.uint8 and low.shape == (16, 16, 3)


@pytest.mark.parametrize("dtype", ["<u2", ">u2", "u1", "<i4", "<f4"])
def test_grey_float_scales_every_kind_of_grey_as_float64_arithmetic_does(dtype):
    """Unsigned 8/16-bit images go through a table of every value: bit for bit the float64 min-max scaling."""
    from fpt.extract.images import grey_float

    rng = np.random.default_rng(3)
    a = rng.integers(7, 250 if dtype == "u1" else 60_000, (33, 47)).astype(dtype)
    reference = ((a.astype(np.float64) - a.min()) / (float(a.max()) - float(a.min()))).astype(np.float32)
    out = np.asarray(grey_float(a))
    assert out.dtype == np.float32 and out.min() == 0 and out.max() == 1
    np.testing.assert_array_equal(out, reference)
    assert not np.asarray(grey_float(np.full((4, 4), 9, dtype=dtype))).any()      # one value: all black


@pytest.mark.parametrize("what", ["loss", "weights"])
def test_a_run_whose_loss_stops_being_finite_ends_and_is_tested_at_its_best_epoch_before(micro_store, tmp_path,
                                                                                          monkeypatch, what):
    """Divergence (e.g. too high an lr) ends the run: the epoch's mean loss not finite, or (an epoch's last update
    made the weights so with every loss of the epoch finite) its validation's probabilities. That epoch is neither
    validated nor checkpointed, the best epoch before it is tested, and metrics.json says where it diverged."""
    from fpt.train import loop

    set_up = loop.set_up

    class NanFromThirdStep:                 # the loss NaN from the third call on, or the weights after the fourth
        def __init__(self, step):
            self.step, self.calls = step, 0

        def __call__(self, *args):
            self.calls += 1
            loss = self.step(*args)
            if what == "weights":
                if self.calls == 4:         # epoch 1's last step: its loss stays finite
                    with torch.no_grad():
                        for p in self.step.model.parameters():
                            p.fill_(float("nan"))
                return loss
            return loss * float("nan") if self.calls > 2 else loss

        def __getattr__(self, name):
            return getattr(self.step, name)

    def diverging(*args, **kwargs):
        run = set_up(*args, **kwargs)
        run.step = NanFromThirdStep(run.step)
        return run

    monkeypatch.setattr(loop, "set_up", diverging)
    metrics = train(tiny_train(micro_store, tmp_path / "run", epochs=4, batch_size=4))   # 2 steps an epoch
    assert metrics.diverged_epoch == 1 and metrics.best_epoch == 0
    assert 0 <= metrics.test["auc"] <= 1 and metrics.val["auc"] is not None
    log = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [0, 1] and log[1]["diverged"] and "val" not in log[1]
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["diverged_epoch"] == 1 and not (tmp_path / "run" / "last.pt").exists()


def test_a_run_that_diverges_before_any_validation_is_one_error_line_with_its_metrics_undefined(micro_store,
                                                                                             tmp_path):
    from tests.helpers import fails_cleanly

    out = tmp_path / "run"
    fails_cleanly(["train", "--store", str(micro_store), "--side-res", "16", "--device", "cpu", "--batch-size", "4",
                   "--epochs", "2", "--lr", "1e10", "--out", str(out)],
                  "training diverged in epoch 0 (its loss is not finite), before any epoch was validated: lower --lr")
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["diverged_epoch"] == 0 and saved["best_epoch"] == -1 and saved["test"]["auc"] is None


def test_values_that_are_not_finite_or_out_of_range_are_refused(micro_store, tmp_path):
    for option, value in (("lr", float("nan")), ("lr", float("inf")), ("weight_decay", float("nan")),
                          ("checkpoint_seconds", float("nan")), ("ft_memory_mb", float("nan"))):
        with pytest.raises(FptError, match="must be a finite number"):
            tiny_train(micro_store, tmp_path / "r", **{option: value})
    for seed in (-1, 2**32):
        with pytest.raises(FptError, match=f"--seed {seed}: must be from 0 to"):
            tiny_train(micro_store, tmp_path / "r", seed=seed)


def test_a_run_is_never_written_into_a_folder_of_other_files(micro_store, image_folder, tmp_path):
    before = sorted(p.name for p in image_folder.iterdir())
    with pytest.raises(FptError, match="holds files that are not a run's"):
        train(tiny_train(micro_store, image_folder))
    assert sorted(p.name for p in image_folder.iterdir()) == before
    with pytest.raises(FptError, match="holds files that are not a run's"):
        train(tiny_train(micro_store, micro_store))            # the store itself
    (tmp_path / "empty").mkdir()
    assert train(tiny_train(micro_store, tmp_path / "empty", epochs=1)).best_epoch == 0


def test_a_run_that_fails_as_it_starts_leaves_no_empty_run_folder_behind(micro_store, tmp_path, monkeypatch):
    """A folder the run made is removed when it fails before logging an epoch; one that existed, or one holding
    a logged epoch and its checkpoint (resumable), is kept."""
    import fpt.train.loop as loop

    def out_of_memory(*args, **kwargs):
        raise RuntimeError("CUDA out of memory")

    real_epoch = loop.train_epoch
    monkeypatch.setattr(loop, "train_epoch", out_of_memory)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny_train(micro_store, tmp_path / "new"))
    assert not (tmp_path / "new").exists()

    (tmp_path / "mine").mkdir()
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny_train(micro_store, tmp_path / "mine"))
    assert (tmp_path / "mine").is_dir()

    def second_epoch_fails(run, epoch, *args):
        return out_of_memory() if epoch == 1 else real_epoch(run, epoch, *args)

    monkeypatch.setattr(loop, "train_epoch", second_epoch_fails)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(tiny_train(micro_store, tmp_path / "started", checkpoint_seconds=0))
    assert (tmp_path / "started" / "last.pt").is_file() and (tmp_path / "started" / "log.jsonl").read_text()


def test_a_failed_start_removes_a_folder_holding_only_an_empty_log_and_unfinished_writes(tmp_path):
    """``removed_unless_used``: a folder the block made, holding only an empty log.jsonl and the temporary file of
    an unfinished write, is removed when the block fails; one whose log holds an epoch is kept (its record)."""
    from fpt.train.loop import removed_unless_used

    for name, log, kept in (("empty", "", False), ("logged", json.dumps({"epoch": 0}) + "\n", True)):
        out = tmp_path / name
        with pytest.raises(KeyboardInterrupt), removed_unless_used(out):
            out.mkdir()
            (out / "log.jsonl").write_text(log)
            (out / ".best.pt.x1y2.tmp").write_bytes(b"partial")
            raise KeyboardInterrupt
        assert out.is_dir() == kept, name


def test_best_epoch_takes_the_higher_score_then_the_lower_val_loss_then_the_earlier_epoch():
    """BestEpoch's rule (model selection): a higher validation score always wins, whatever the loss; a tied
    score wins only with a strictly lower val loss; a tie in both keeps the earlier epoch."""
    from fpt.train.loop import BestEpoch

    def val(auc, loss):
        return {"auc": auc, "acc": 0.5, "loss": loss}

    best = BestEpoch()
    assert best.improved_by(0, val(0.7, 0.5)) and best.epoch == 0
    assert not best.improved_by(1, val(0.7, 0.6)) and best.epoch == 0          # tied score, higher loss
    assert not best.improved_by(2, val(0.7, 0.5)) and best.epoch == 0          # tied score and loss: the earlier
    assert best.improved_by(3, val(0.7, 0.4)) and best.epoch == 3              # tied score, lower loss
    assert best.loss == 0.4 and "lower val loss" in best.reason
    assert best.improved_by(4, val(0.8, 2.0)) and best.epoch == 4              # higher score, any loss
    assert not best.improved_by(5, val(0.6, 0.1)) and best.epoch == 4          # lower score, any loss
    assert best.score == 0.8 and best.val == val(0.8, 2.0) and best.reason == "highest val AUC"
    acc = BestEpoch()                                                          # AUC undefined: accuracy
    assert acc.improved_by(0, {"auc": None, "acc": 0.5, "loss": 1.0})
    assert not acc.improved_by(1, {"auc": None, "acc": 0.5, "loss": 1.0}) and acc.epoch == 0


def test_an_auc_of_zero_is_the_worst_score_not_an_undefined_one():
    """validation_score falls back to accuracy only where AUC is undefined (None). An AUC of 0.0 (every positive
    ranked below every negative) is a defined score, the worst: a falsy-value fallback would rank that epoch by
    its accuracy and let it beat an epoch with a higher AUC."""
    from fpt.train.loop import BestEpoch
    from fpt.train.results import validation_score

    inverted = {"auc": 0.0, "acc": 0.9, "loss": 1.0}
    chance = {"auc": 0.5, "acc": 0.1, "loss": 1.0}
    assert validation_score(inverted) == inverted["auc"]
    best = BestEpoch()
    assert best.improved_by(0, inverted)
    assert best.improved_by(1, chance) and best.epoch == 1


def test_each_step_of_an_epoch_trains_on_its_own_augmentation_draws(micro_store, tmp_path, monkeypatch):
    """An epoch's augmentation is drawn once, [steps, DRAWS, batch size], and step i takes row i (cut to its
    batch): every batch gets crops, flips and jitter of its own, not the first batch's once more."""
    from fpt.train.data import SideInput
    from fpt.train.step import TrainStep

    epochs, steps = [], []
    real_draw, real_step = SideInput.draw, TrainStep.__call__
    monkeypatch.setattr(SideInput, "draw", lambda self, *a: epochs.append(real_draw(self, *a)) or epochs[-1])
    monkeypatch.setattr(TrainStep, "__call__", lambda self, batch, draws: steps.append(draws.clone())
                        or real_step(self, batch, draws))
    train(tiny_train(micro_store, tmp_path / "run", epochs=1))
    (drawn,) = epochs
    assert len(steps) == len(drawn) > 1
    for i, draws in enumerate(steps):
        assert torch.equal(draws, drawn[i, :, :draws.shape[-1]]), i


@pytest.mark.parametrize("checkpoint_seconds", [0, 3600])
def test_best_pt_holds_the_best_epochs_model_when_later_epochs_are_worse(micro_store, tmp_path, monkeypatch,
                                                                         checkpoint_seconds):
    """The validation score falls each epoch (the loop's score function replaced), so epoch 0 is the best of 3:
    best.pt must hold epoch 0's weights (not a later epoch's), whether checkpoints are written every epoch or
    only at the end; evaluated on val it gives epoch 0's logged val metrics, and the run was tested on it."""
    from fpt.train import loop

    scores = iter([0.9, 0.8, 0.7])
    monkeypatch.setattr(loop, "validation_score", lambda metrics: next(scores))
    weights = []
    real_epoch = loop.train_epoch

    def recording_epoch(run, epoch, *args):
        record = real_epoch(run, epoch, *args)
        weights.append({k: v.detach().clone() for k, v in run.model.state_dict().items()})
        return record

    monkeypatch.setattr(loop, "train_epoch", recording_epoch)
    out = tmp_path / "run"
    metrics = train(tiny_train(micro_store, out, epochs=3, checkpoint_seconds=checkpoint_seconds))
    assert metrics.best_epoch == 0 and len(weights) == 3
    best = torch.load(out / "best.pt", weights_only=True)
    assert best["epoch"] == 0
    assert all(torch.equal(best["model"][k], weights[0][k]) for k in weights[0])
    assert not all(torch.equal(best["model"][k], weights[2][k]) for k in weights[2])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    val = evaluate_checkpoint(micro_store, out / "best.pt", "val", device="cpu").metrics
    assert val == pytest.approx({k: log[0]["val"][k] for k in val})
    test = evaluate_checkpoint(micro_store, out / "best.pt", "test", device="cpu").metrics
    assert test == pytest.approx(metrics.test)


def test_the_steady_train_rate_leaves_out_the_first_epoch_of_the_run(micro_store, tmp_path, monkeypatch):
    """``steady_train_samples_per_s`` is the rate of the epochs after the first of the call (whose time holds the
    warm-up and any compiling): none for a one-epoch run. Each epoch's time is replaced (the first made slow), so
    the rates are known: the steady one is the later epochs' samples over their seconds."""
    from fpt.train import loop

    real_epoch, epochs = loop.train_epoch, []

    def timed_epoch(run, epoch, *args):
        record = real_epoch(run, epoch, *args)
        record["seconds"] = 5.0 if not epochs else 0.5 + 0.25 * len(epochs)
        epochs.append((record["samples"], record["seconds"]))
        return record

    monkeypatch.setattr(loop, "train_epoch", timed_epoch)
    metrics = train(tiny_train(micro_store, tmp_path / "three", epochs=3))
    later = epochs[1:]
    assert len(later) == 2
    assert metrics.throughput.steady_train_samples_per_s == pytest.approx(
        sum(n for n, _ in later) / sum(s for _, s in later), abs=0.01)
    epochs.clear()
    assert train(tiny_train(micro_store, tmp_path / "one", epochs=1)).throughput.steady_train_samples_per_s is None
