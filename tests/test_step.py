"""The one training step: compiled (torch.compile's default mode on the CPU here) and eager give the same losses
and weights; the fallback to eager when compiling fails; padded evaluation; the versioned checkpoint and
atomic writes; the background checkpoint writer."""
import math
import threading
import warnings

import pytest
import torch

from fpt import FptError
from fpt.train.files import (FORMAT_VERSION, CheckpointWriter, TensorCopies, atomic_write, atomic_write_text,
                             copy_tensors, read_checkpoint, save_checkpoint)
from fpt.train.memory import StepShape, make_step, step_batch
from fpt.train.model import ModelSpec
from fpt.train.step import (GRAPH_WARMUP, STREAMS_HELD, CompiledOrEager, TrainStep, pad_batch,
                            stream_of_its_own)

SMALL = ModelSpec(lpm_dim=32, lpm_heads=2, head_dim=16, patch_size=8, layers=2, n_classes=2, side_res=16, prompts=3,
                  reduction=4)
SHAPE = StepShape(batch_size=4, layers=2, heads=2, k=5, head_dim=16, image_res=32)
CPU = torch.device("cpu")
STEPS = 4
# compiled kernels reorder floating-point sums: losses agree to this relative tolerance over STEPS steps
LOSS_RTOL = 1e-4


def losses_and_weights(compile: bool) -> tuple[list[float], dict[str, torch.Tensor]]:
    torch.manual_seed(0)
    step = make_step(SMALL, CPU, compile=compile, steps=STEPS)
    assert step.is_compiled == compile
    batches = [step_batch(SMALL, SHAPE, CPU) for _ in range(STEPS)]
    draws = step.side_input.draw(STEPS, SHAPE.batch_size)
    losses = [float(step(b, draws[i])) for i, b in enumerate(batches)]
    return losses, {k: v.detach().clone() for k, v in step.model.state_dict().items()}


def test_compiled_step_gives_the_eager_losses():
    import torch._inductor.config as inductor

    eager, eager_weights = losses_and_weights(compile=False)
    # inductor's own random numbers differ from eager's: the dropout masks must come from the run's generator,
    # drawn outside the compiled function, for these losses to agree
    with inductor.patch(fallback_random=False):
        compiled, compiled_weights = losses_and_weights(compile=True)
    assert len(set(eager)) == STEPS                      # the model learns: every step's loss differs
    assert compiled == pytest.approx(eager, rel=LOSS_RTOL)
    for k, w in eager_weights.items():
        torch.testing.assert_close(compiled_weights[k], w, rtol=1e-3, atol=1e-4)


def test_the_step_is_cross_entropy_clip_adamw_and_a_cosine_schedule_written_out():
    """TrainStep against the step written out by hand from the paper's recipe, on the same model, batches and
    augmentation draws: mean cross-entropy, gradients scaled to a total norm of at most the clip, AdamW (decoupled
    weight decay, bias-corrected moments), the learning rate on a cosine from lr to 0 over the run's steps."""
    from functools import partial

    from fpt.train.data import SideInput
    from fpt.train.model import seeded_model, use_generator
    from fpt.train.step import CLIP_NORM, make_optimizer

    lr, weight_decay, clip, beta1, beta2, eps = 1e-2, 0.1, 0.05, 0.9, 0.999, 1e-8
    assert CLIP_NORM == 1.0                             # the paper's; a smaller one here, so that it acts

    def model():
        m = seeded_model(SMALL, 0)
        use_generator(m, torch.Generator().manual_seed(0))          # the same dropout masks in both
        return m

    torch.manual_seed(0)
    batches = [step_batch(SMALL, SHAPE, CPU) for _ in range(STEPS)]
    draws = SideInput(SMALL.side_res, (0.5,) * 3, (0.25,) * 3, seed=0).draw(STEPS, SHAPE.batch_size)
    ours = model()
    optimizer, schedule = make_optimizer(ours, lr, weight_decay, STEPS, CPU)
    step = TrainStep(ours, SideInput(SMALL.side_res, (0.5,) * 3, (0.25,) * 3), optimizer, schedule, clip_norm=clip)
    losses = [float(step(b, draws[i])) for i, b in enumerate(batches)]

    ref = model()
    side_input, params = SideInput(SMALL.side_res, (0.5,) * 3, (0.25,) * 3), list(ref.parameters())
    m, v, norms, ref_losses = [torch.zeros_like(p) for p in params], [torch.zeros_like(p) for p in params], [], []
    for t, batch in enumerate(batches):
        logits = ref.forward_batch(batch, partial(side_input, train=True, draws=draws[t]))
        loss = -logits.log_softmax(-1)[torch.arange(len(logits)), batch["labels"]].mean()
        for p in params:
            p.grad = None
        loss.backward()
        norm = torch.sqrt(sum((p.grad ** 2).sum() for p in params))
        scale = min(1.0, clip / (float(norm) + 1e-6))
        lr_t = lr * (1 + math.cos(math.pi * t / STEPS)) / 2
        with torch.no_grad():
            for p, m_i, v_i in zip(params, m, v):
                g = p.grad * scale
                m_i.mul_(beta1).add_((1 - beta1) * g)
                v_i.mul_(beta2).add_((1 - beta2) * g * g)
                p.mul_(1 - lr_t * weight_decay)
                p.sub_(lr_t * (m_i / (1 - beta1 ** (t + 1))) / ((v_i / (1 - beta2 ** (t + 1))).sqrt() + eps))
        ref_losses.append(float(loss.detach()))
        norms.append(float(norm))
    assert max(norms) > clip                            # the clip acted
    assert losses == pytest.approx(ref_losses, rel=1e-5)
    for (name, ours_p), ref_p in zip(ours.named_parameters(), params):
        torch.testing.assert_close(ours_p, ref_p, rtol=1e-5, atol=1e-6, msg=name)


def steps_and_evaluation_without_recompiling(device: torch.device) -> TrainStep:
    """STEPS compiled steps, evaluation of a full and of a padded partial batch, one more step, with dynamo's
    ``error_on_recompile``: a recompile (a guard failing on state the first call changed) costs a whole
    compilation, and on CUDA a second graph capture, in every run. Returns the step; fails on any warning."""
    torch._dynamo.reset()
    try:
        with torch._dynamo.config.patch(error_on_recompile=True), warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            step = make_step(SMALL, device, compile=True, steps=STEPS)
            draws = step.side_input.draw(STEPS, SHAPE.batch_size).to(device)
            for i in range(STEPS):
                step(step_batch(SMALL, SHAPE, device), draws[i])
            step.model.eval()
            step.probabilities(step_batch(SMALL, SHAPE, device), SHAPE.batch_size)
            step.probabilities(step_batch(SMALL, StepShape(**{**vars(SHAPE), "batch_size": 3}), device),
                               SHAPE.batch_size)
            step.model.train()                            # the next epoch
            step(step_batch(SMALL, SHAPE, device), draws[0])
    finally:
        torch._dynamo.reset()
    assert [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)] == []
    assert step.is_compiled
    return step


def test_the_step_and_the_evaluation_compile_once(monkeypatch):
    """Dynamo's own backend here: the guards are dynamo's whatever the backend, and no inductor codegen."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", dynamic=False))
    steps_and_evaluation_without_recompiling(CPU)


def test_the_compiled_step_is_one_graph(monkeypatch):
    """No graph break in the compiled forward and backward: a break (e.g. at a random op given an explicit
    generator, which dynamo cannot trace) splits the step into pieces with eager work between them."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", dynamic=False))
    torch._dynamo.reset()
    counters.clear()
    try:
        step = make_step(SMALL, CPU, compile=True, steps=STEPS)
        draws = step.side_input.draw(2, SHAPE.batch_size)
        for i in range(2):
            step(step_batch(SMALL, SHAPE, CPU), draws[i])
        breaks, graphs = dict(counters["graph_break"]), counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert step.is_compiled and graphs >= 1
    assert breaks == {}


def test_a_compiled_partial_batch_draws_the_masks_eager_draws(monkeypatch):
    """The last, smaller batch of each epoch between full ones: the compiled step draws its dropout masks of that
    size from the run's generator, as eager does, and the next full batch trains on (losses equal); the two
    sizes compile once each, not once per epoch."""
    from torch._dynamo.utils import counters

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", dynamic=False))
    sizes = [SHAPE.batch_size, SHAPE.batch_size, 3] * 2 + [SHAPE.batch_size]

    def losses(compile: bool) -> list[float]:
        torch.manual_seed(0)
        step = make_step(SMALL, CPU, compile=compile, steps=len(sizes))
        data = torch.Generator().manual_seed(1)
        batches = [step_batch(SMALL, StepShape(**{**vars(SHAPE), "batch_size": n}), CPU, data) for n in sizes]
        draws = step.side_input.draw(len(sizes), SHAPE.batch_size)
        return [float(step(b, draws[i, :, :len(b["labels"])])) for i, b in enumerate(batches)]

    torch._dynamo.reset()
    counters.clear()
    try:
        compiled = losses(compile=True)
        graphs = counters["stats"]["unique_graphs"]
    finally:
        torch._dynamo.reset()
    assert compiled == pytest.approx(losses(compile=False), rel=LOSS_RTOL)
    assert graphs == 2


def test_a_failing_compilation_falls_back_to_eager_with_one_warning(monkeypatch):
    def broken(fn, **_):
        def run(*args):
            raise RuntimeError("no compiler here\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken)
    twice = CompiledOrEager(lambda x: x * 2, compile=True, what="test function")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert twice(torch.tensor(3.0)) == 6 and twice(torch.tensor(4.0)) == 8
    assert len(caught) == 1 and "no compiler here" in str(caught[0].message)
    assert "second line" not in str(caught[0].message) and not twice.is_compiled


def test_a_failing_backward_compilation_falls_back_to_eager(monkeypatch):
    class FailingBackward(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            raise RuntimeError("backward did not compile")

    monkeypatch.setattr(torch, "compile", lambda fn, **_: lambda *args: FailingBackward.apply(fn(*args)))
    torch.manual_seed(0)
    step = make_step(SMALL, CPU, compile=True)
    before = [p.detach().clone() for p in step.params]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step(step_batch(SMALL, SHAPE, CPU), step.side_input.draw(1, SHAPE.batch_size)[0])
    assert len(caught) == 1 and "backward did not compile" in str(caught[0].message) and not step.is_compiled
    assert any(not torch.equal(a, p) for a, p in zip(before, step.params))     # the eager step still trained


def test_a_cuda_graph_is_refused_off_cuda_in_one_line():
    with pytest.raises(FptError, match=r"^--cuda-graph needs a CUDA device \(this run's device is cpu\)$"):
        make_step(SMALL, CPU, cuda_graph=True)
    assert not make_step(SMALL, CPU).is_captured and not make_step(SMALL, CPU, cuda_graph=False).is_captured


def test_a_restored_optimizer_state_takes_the_options_of_this_runs_step():
    """last.pt of a run captured on CUDA holds AdamW's capturable option; resumed on a CPU the step sets it back
    (AdamW refuses capturable on a CPU)."""
    torch.manual_seed(0)
    step = make_step(SMALL, CPU)
    saved = step.optimizer.state_dict()
    saved["param_groups"][0]["capturable"] = True
    step.optimizer.load_state_dict(saved)
    resumed = TrainStep(step.model, step.side_input, step.optimizer, step.schedule)
    assert not resumed.optimizer.param_groups[0]["capturable"]
    assert math.isfinite(float(resumed(step_batch(SMALL, SHAPE, CPU), step.side_input.draw(1, SHAPE.batch_size)[0])))


def test_padded_evaluation_gives_the_unpadded_probabilities():
    torch.manual_seed(0)
    step = make_step(SMALL, CPU)
    step.model.eval()
    batch = step_batch(SMALL, StepShape(**{**vars(SHAPE), "batch_size": 3}), CPU)
    padded = pad_batch(batch, 8)
    assert len(padded["labels"]) == 8 and torch.equal(padded["keys"][3:], batch["keys"][2:3].expand(5, -1, -1, -1, -1))
    torch.testing.assert_close(step.eval_probabilities(padded)[:3], step.probabilities(batch))
    torch.testing.assert_close(step.probabilities(batch, 8), step.probabilities(batch))   # eager: no padding


def test_streams_of_their_own_stay_apart_while_held_though_the_pool_goes_round():
    """torch's pool hands out its streams round-robin (a 5th draw from a pool of 4 is the 1st again); the streams
    of a sweep's runs in threads stay apart while held, and one is refused in one line when all are held."""
    import itertools
    from contextlib import ExitStack
    from types import SimpleNamespace

    ids = itertools.count()
    pool = lambda: SimpleNamespace(device_index=-7, stream_id=next(ids) % 4)      # noqa: E731
    with ExitStack() as held:
        streams = [held.enter_context(stream_of_its_own(CPU, pool)) for _ in range(2)]
        pool()                                                          # drawn meanwhile by something else
        streams += [held.enter_context(stream_of_its_own(CPU, pool)) for _ in range(2)]
        assert sorted(s.stream_id for s in streams) == [0, 1, 2, 3]
        with pytest.raises(FptError, match=r"no CUDA stream of its own is left .*\(4 are held\)"):
            held.enter_context(stream_of_its_own(CPU, pool))
    assert not STREAMS_HELD
    with stream_of_its_own(CPU, pool) as a, stream_of_its_own(CPU, pool) as b:
        assert a.stream_id != b.stream_id and len(STREAMS_HELD) == 2


def test_tensor_copies_are_copy_tensors_refreshed_in_place_by_one_fused_copy(monkeypatch):
    """A run's checkpoint copies after each epoch: the nesting and values of ``copy_tensors``, in the same
    tensors from one refresh to the next (one ``torch._foreach_copy_``), untouched by training between
    refreshes; new copies when the tensors change shape."""
    step = make_step(SMALL, CPU, steps=STEPS)
    step(step_batch(SMALL, SHAPE, CPU), step.side_input.draw(1, SHAPE.batch_size)[0])
    state = lambda: {"model": step.model.state_dict(), "optimizer": step.optimizer.state_dict()}  # noqa: E731
    copies = TensorCopies()
    first = copies.refresh(state())
    expected = copy_tensors(state())
    assert first.keys() == expected.keys() and first["optimizer"].keys() == expected["optimizer"].keys()
    assert all(torch.equal(a, b) for a, b in zip(copies.copies, [*expected["model"].values(), *(
        t for s in expected["optimizer"]["state"].values() for t in s.values())]))
    assert first["optimizer"]["param_groups"] == expected["optimizer"]["param_groups"]
    step(step_batch(SMALL, SHAPE, CPU), step.side_input.draw(1, SHAPE.batch_size)[0])
    assert all(torch.equal(first["model"][k], v) for k, v in expected["model"].items())   # a snapshot
    fused, held = [], list(copies.copies)
    monkeypatch.setattr(torch, "_foreach_copy_", lambda dst, src, real=torch._foreach_copy_: fused.append(1)
                        or real(dst, src))
    second = copies.refresh(state())
    assert len(fused) == 1 and all(a is b for a, b in zip(held, copies.copies))
    assert all(second["model"][k] is first["model"][k] for k in first["model"])
    assert all(torch.equal(second["model"][k], v) for k, v in step.model.state_dict().items())
    assert not all(torch.equal(second["model"][k], v) for k, v in expected["model"].items())
    w3 = copies.refresh({"w": torch.zeros(3)})["w"]
    assert copies.refresh({"w": torch.ones(3)})["w"] is w3 and torch.equal(w3, torch.ones(3))
    assert copies.refresh({"w": torch.zeros(4)})["w"].shape == (4,)


def test_tensor_copies_are_made_anew_when_a_tensor_changes_dtype():
    """Copies of another dtype are not refreshed into (a fused copy would convert the values silently): a tensor
    whose dtype changed gets a copy of its own dtype, holding its values exactly."""
    copies = TensorCopies()
    first = copies.refresh({"w": torch.zeros(3), "n": torch.zeros(2, dtype=torch.int32)})
    w = torch.tensor([1 / 3, 2 / 3, 1.0 + 1e-12], dtype=torch.float64)
    n = torch.tensor([2**40, -1])
    second = copies.refresh({"w": w, "n": n})
    assert second["w"].dtype == torch.float64 and torch.equal(second["w"], w) and second["w"] is not w
    assert second["n"].dtype == torch.int64 and torch.equal(second["n"], n)
    assert first["w"].dtype == torch.float32


def test_checkpoints_carry_a_format_version(tmp_path):
    save_checkpoint(tmp_path / "best.pt", "best", {"epoch": 3})
    assert read_checkpoint(tmp_path / "best.pt", "best") == {"fpt_checkpoint": FORMAT_VERSION, "kind": "best",
                                                              "epoch": 3}
    with pytest.raises(FptError, match="is a best checkpoint, not an unfinished run's last.pt"):
        read_checkpoint(tmp_path / "best.pt", "last")
    for version, advice in ((FORMAT_VERSION + 1, "upgrade fpt"), (0, "train again")):
        torch.save({"fpt_checkpoint": version, "kind": "best"}, tmp_path / "other.pt")
        with pytest.raises(FptError, match=f"checkpoint format {version}, this fpt reads format "
                                           f"{FORMAT_VERSION}: {advice}"):
            read_checkpoint(tmp_path / "other.pt", "best")
    torch.save({"model": {}, "spec": {}}, tmp_path / "unversioned.pt")
    with pytest.raises(FptError, match="no format version"):
        read_checkpoint(tmp_path / "unversioned.pt", "best")


def test_atomic_write_leaves_the_old_file_and_no_temporary_on_failure(tmp_path):
    target = tmp_path / "metrics.json"
    atomic_write_text(target, "old")

    def fails_halfway(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(target, fails_halfway)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["metrics.json"]


def test_atomic_write_writes_its_temporary_file_beside_the_target(tmp_path):
    """The temporary file is made in the target's folder: only a rename within one filesystem is atomic (from
    the system's temporary folder, often another filesystem, os.replace fails with EXDEV)."""
    target, written = tmp_path / "run" / "metrics.json", []
    target.parent.mkdir()
    atomic_write(target, lambda tmp: written.append(tmp) or tmp.write_text("new"))
    assert written[0].parent == target.parent and target.read_text() == "new"
    assert sorted(p.name for p in target.parent.iterdir()) == ["metrics.json"]


def test_checkpoint_writer_writes_cpu_copies_and_reports_a_failure(tmp_path):
    written = []
    state = {"w": torch.ones(2)}
    with CheckpointWriter(save=lambda path, kind, content: written.append((path, kind, content))) as writer:
        writer.submit(tmp_path / "a.pt", "last", {"model": state})
        state["w"].add_(1)                                 # training goes on: the submitted copy is unchanged
        writer.flush()
    assert torch.equal(written[0][2]["model"]["w"], torch.ones(2))

    def failing(path, kind, content):
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        with CheckpointWriter(save=failing) as writer:
            writer.submit(tmp_path / "b.pt", "last", {})
            writer.flush()


def test_checkpoint_writer_writes_nothing_after_a_failed_write(tmp_path):
    """Once a write fails, checkpoints already queued behind it are not written either: a last.pt written after
    a best.pt that failed would let ``--resume`` continue a run whose best checkpoint is missing or stale."""
    written, failing = [], threading.Event()

    def save(path, kind, content):
        if kind == "best":
            failing.wait(timeout=10)        # the next checkpoint is queued before this write fails
            raise OSError("disk full")
        written.append(path)

    with pytest.raises(OSError, match="disk full"):
        with CheckpointWriter(save=save) as writer:
            writer.submit(tmp_path / "best.pt", "best", {})
            writer.submit(tmp_path / "last.pt", "last", {})
            failing.set()
            writer.flush()
    assert written == []


def test_checkpoint_writer_finishes_pending_writes_and_keeps_the_trainings_own_error(tmp_path):
    """Training stopped by an error (Ctrl-C, a failure): leaving the block waits for the checkpoints already
    submitted (so that last.pt is whole for --resume), and the training's error is the one raised, not a failed
    write's."""
    import time

    written, submitted = [], threading.Event()

    def slow(path, kind, content):
        submitted.wait(timeout=10)
        time.sleep(0.2)                     # still writing when the training's error leaves the block
        written.append((path.name, content["epoch"]))

    with pytest.raises(KeyboardInterrupt):
        with CheckpointWriter(save=slow) as writer:
            writer.submit(tmp_path / "last.pt", "last", {"epoch": 3})
            submitted.set()
            raise KeyboardInterrupt
    assert written == [("last.pt", 3)]

    def failing(path, kind, content):
        raise OSError("disk full")

    with pytest.raises(ValueError, match="stopped by the caller"):
        with CheckpointWriter(save=failing) as writer:
            writer.submit(tmp_path / "last.pt", "last", {})
            raise ValueError("stopped by the caller")


CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def cuda_losses(compile: bool, cuda_graph: bool, steps: int, spec: ModelSpec = SMALL, shapes=None, seed: int = 0,
                refill: bool = False) -> tuple[list[float], TrainStep]:
    """The losses of ``steps`` steps on random batches; ``refill``: each batch is copied into the same tensors
    before its step, as ``batches(reuse=True)`` gathers them."""
    cuda = torch.device("cuda")
    step = make_step(spec, cuda, compile=compile, steps=steps, cuda_graph=cuda_graph, seed=seed)
    data = torch.Generator().manual_seed(seed)            # not the global one: runs in threads draw at once
    batches = [step_batch(spec, shape, cuda, data) for shape in (shapes or [SHAPE] * steps)]
    if refill:
        reused = {n: t.clone() for n, t in batches[0].items()}
        batches = ({n: reused[n].copy_(t) for n, t in b.items()} for b in batches)    # each just before its step
    draws = step.side_input.draw(steps, SHAPE.batch_size).to(cuda)
    return [float(step(b, draws[i, :, :len(b["labels"])])) for i, b in enumerate(batches)], step


@CUDA
def test_cuda_graph_step_gives_the_eager_losses():
    """On CUDA the whole step is captured after GRAPH_WARMUP eager steps and replayed: the same losses (the same
    kernels: to float precision) and weights as the step run eagerly, through the lr schedule; with
    torch.compile inside the graph too."""
    import torch._inductor.config as inductor

    steps = GRAPH_WARMUP + 5
    eager, eager_step = cuda_losses(compile=False, cuda_graph=False, steps=steps)
    captured, captured_step = cuda_losses(compile=False, cuda_graph=True, steps=steps)
    assert captured_step.is_captured and not eager_step.is_captured and len(set(eager)) == steps
    assert captured == pytest.approx(eager, rel=1e-5)
    for a, b in zip(captured_step.model.parameters(), eager_step.model.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
    with inductor.patch(fallback_random=True):
        compiled, compiled_step = cuda_losses(compile=True, cuda_graph=True, steps=steps)
    assert compiled_step.is_compiled and compiled_step.is_captured
    assert compiled == pytest.approx(eager, rel=1e-3)


@CUDA
@pytest.mark.parametrize("compile", [False, True])
def test_on_cuda_a_partial_batch_after_the_capture_runs_eagerly_and_trains_the_same(compile, monkeypatch):
    """drop_last off: the last batch of an epoch is smaller than the captured one; it runs eagerly (the graph
    holds one shape), on the same weights and AdamW state, and the step after it replays the graph again
    (compiled: with the dropout mask tensor the graph captured still alive and drawn into; dynamo's own backend,
    since what is tested is the masks' tensors, not inductor's code, and the lease's test step is short)."""
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", dynamic=False))
    small = StepShape(**{**vars(SHAPE), "batch_size": 3})
    shapes = [SHAPE] * (GRAPH_WARMUP + 2) + [small, SHAPE, SHAPE]
    eager, _ = cuda_losses(compile=False, cuda_graph=False, steps=len(shapes), shapes=shapes)
    captured, step = cuda_losses(compile=compile, cuda_graph=True, steps=len(shapes), shapes=shapes)
    assert step.is_captured and step.is_compiled == compile
    assert captured == pytest.approx(eager, rel=LOSS_RTOL if compile else 1e-5)


@CUDA
def test_on_cuda_a_batch_refilled_in_place_trains_as_fresh_batches_and_is_not_copied():
    """fpt train gathers every full batch into the same device tensors (``batches(reuse=True)``); the captured
    step keeps the tensors of the call it captured as its inputs, reads such a batch where it is, and trains as
    eagerly on fresh batches."""
    steps = GRAPH_WARMUP + 4
    eager, _ = cuda_losses(compile=False, cuda_graph=False, steps=steps)
    captured, step = cuda_losses(compile=False, cuda_graph=True, steps=steps, refill=True)
    assert step.is_captured and captured == pytest.approx(eager, rel=1e-5)
    batch = {n: t for n, t in step._step_graph.static.items() if n != "draws"}
    copies = []
    original = torch.Tensor.copy_
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.Tensor, "copy_", lambda self, *a, **k: copies.append(self) or original(self, *a, **k))
        step(batch, step._step_graph.static["draws"].clone())
    assert len(copies) == 1                                     # the draws, a new tensor; the batch not at all


@CUDA
def test_on_cuda_the_captured_evaluation_gives_the_eager_probabilities():
    cuda = torch.device("cuda")
    step = make_step(SMALL, cuda, cuda_graph=True)
    step.model.eval()
    batches = [step_batch(SMALL, SHAPE, cuda) for _ in range(GRAPH_WARMUP + 3)]
    partial = step_batch(SMALL, StepShape(**{**vars(SHAPE), "batch_size": 3}), cuda)
    for b in [*batches, partial]:
        expected = step.eval_probabilities(b)
        torch.testing.assert_close(step.probabilities(b, SHAPE.batch_size), expected, rtol=1e-5, atol=1e-6)
    assert step._eval_graph.is_captured


@CUDA
def test_on_cuda_a_failing_capture_falls_back_to_eager_with_one_warning(monkeypatch):
    class Refused(torch.cuda.CUDAGraph):
        def capture_begin(self, *args, **kwargs):
            raise RuntimeError("capture refused here")

    monkeypatch.setattr(torch.cuda, "CUDAGraph", Refused)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        losses, step = cuda_losses(compile=False, cuda_graph=True, steps=GRAPH_WARMUP + 3)
    refused = [w for w in caught if "CUDA graph failed" in str(w.message)]
    assert len(refused) == 1 and "capture refused here" in str(refused[0].message)
    assert not step.is_captured and all(map(math.isfinite, losses))


@CUDA
def test_on_cuda_the_capture_lets_another_thread_copy_from_the_device_meanwhile():
    """fpt train's checkpoint writer copies tensors from the GPU on a thread of its own, possibly while the step
    or the evaluation is being captured: neither the capture nor those copies fail. (What the writer copies is
    not random: while any capture is underway, torch refuses draws from the device's default generator.)"""
    import threading

    stop, errors, copies = threading.Event(), [], []

    def copy_from_the_device():
        try:
            while not stop.is_set():
                copies.append(float(torch.arange(1 << 16, device="cuda", dtype=torch.float32).cpu().sum()))
        except Exception as e:          # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    writer = threading.Thread(target=copy_from_the_device)
    writer.start()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            losses, step = cuda_losses(compile=False, cuda_graph=True, steps=GRAPH_WARMUP + 3)
    finally:
        stop.set()
        writer.join()
    assert step.is_captured and not errors and copies and all(map(math.isfinite, losses))
    assert not [w for w in caught if "CUDA graph failed" in str(w.message)]


@CUDA
def test_on_cuda_runs_in_threads_capture_and_replay_as_they_would_alone():
    """A sweep's runs in threads of one process, each on a CUDA stream of its own where it also warms up and
    captures: their captures take turns (GRAPH_LOCK), each replay advances its own dropout generator, and each
    run's losses are those it has alone. 12 runs, as in the bench's sweep: more streams than torch's pool holds
    if each drew three (lease 5)."""
    import threading

    steps, seeds = GRAPH_WARMUP + 6, range(12)
    alone = {seed: cuda_losses(compile=False, cuda_graph=True, steps=steps, seed=seed)[0] for seed in seeds}
    together, errors = {}, []

    def run(seed: int) -> None:
        try:
            with stream_of_its_own(torch.device("cuda")) as stream, torch.cuda.stream(stream):
                losses, step = cuda_losses(compile=False, cuda_graph=True, steps=steps, seed=seed)
            on_its_stream = step._step_graph.side == stream and step._eval_graph.side in (None, stream)
            together[seed] = losses if step.is_captured and on_its_stream else None
        except Exception as e:          # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(seed,)) for seed in seeds]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and together == alone and len({tuple(v) for v in alone.values()}) == len(seeds)


@CUDA
def test_on_cuda_a_released_step_frees_its_graphs_and_captures_again():
    steps = GRAPH_WARMUP + 2
    losses, step = cuda_losses(compile=False, cuda_graph=True, steps=steps)
    assert step.is_captured
    step.release()
    assert not step.is_captured
    batch = step_batch(SMALL, SHAPE, torch.device("cuda"), torch.Generator().manual_seed(5))
    draws = step.side_input.draw(steps, SHAPE.batch_size).to("cuda")
    assert all(math.isfinite(float(step(batch, draws[i]))) for i in range(steps)) and step.is_captured


@CUDA
def test_on_cuda_a_dead_graph_is_not_collected_during_a_capture():
    """A finished run's graph held only by a reference cycle: Python's cyclic GC may collect it at any
    allocation, and destroying a graph inside another's capture invalidates that capture. The capture runs with
    the GC off (here it would otherwise collect at nearly every allocation)."""
    import gc

    from fpt.train.step import StepGraph

    class Cycle:
        def __init__(self, graph):
            self.graph, self.me = graph, self

    x = torch.ones(8, device="cuda")
    dead = StepGraph(lambda inputs: inputs["x"] * 2, True, "dead", warmup=0)
    dead({"x": x})
    assert dead.is_captured
    Cycle(dead)
    del dead

    def allocating(inputs):
        junk = [[i] for i in range(2000)]                # allocations: chances for an automatic collection
        return inputs["x"] + len(junk)

    thresholds = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            live = StepGraph(allocating, True, "live", warmup=0)
            out = live({"x": x})
    finally:
        gc.set_threshold(*thresholds)
    assert live.is_captured and not [w for w in caught if "CUDA graph failed" in str(w.message)]
    assert torch.equal(out, x + 2000) and gc.isenabled()


@CUDA
def test_cuda_graph_step_compiles_once():
    """Compiled and captured: one compilation each for the step and the evaluation (a recompile would cost a
    whole compilation in every run)."""
    step = steps_and_evaluation_without_recompiling(torch.device("cuda"))
    assert step.is_captured


@CUDA
@pytest.mark.parametrize("compile", [False, True])
def test_cuda_training_run(micro_store, tmp_path, compile):
    from fpt.config import train_config
    from fpt.train import train

    m = train(train_config(micro_store, None, out=tmp_path / "run", side_res=16, epochs=3, batch_size=4, prompts=3,
                           device="cuda", cache="gpu", compile=compile))
    assert m.throughput.captured and m.throughput.compiled == compile and m.data["cache"]["mode"] == "gpu"
    assert m.throughput.steady_train_samples_per_s > 0 and 0 <= m.test["auc"] <= 1
