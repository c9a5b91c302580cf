"""ReptileOptimizer inside the frameworks people train with (issue 14, section 4).

Each framework's test is skipped when the framework is not installed (pip install
reptile-fused[test] installs them).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.nn.functional as F

from reptile_fused import MetaLRScheduler, ReptileOptimizer, available_backends


def make_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(3, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))


def batches(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 3, generator=g), torch.randn(6, 2, generator=g)) for _ in range(n)]


def run_task(model, opt, x, y, steps: int = 2) -> None:
    with opt.task():
        for _ in range(steps):
            opt.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()


def params(model) -> list[torch.Tensor]:
    return [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------- storage sharing


def test_each_parameter_has_a_storage_of_its_own_over_one_flat_buffer():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    buf = opt.flat_buffers[0]
    storages = {p.untyped_storage().data_ptr() for p in model.parameters()}
    assert len(storages) == len(list(model.parameters()))
    for p in model.parameters():
        assert p.untyped_storage().nbytes() == p.numel() * p.element_size()
    # ...while the memory is the flat buffer's: a write to the buffer shows in the model.
    with torch.no_grad():
        buf.data.fill_(0.5)
    assert all(bool((p == 0.5).all()) for p in model.parameters())
    del opt, buf  # the parameters keep the flat buffer alive
    assert all(bool((p == 0.5).all()) for p in model.parameters())


def test_safetensors_save_model_and_save_file_round_trip(tmp_path):
    st = pytest.importorskip("safetensors.torch")
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.1)
    x, y = batches(1)[0]
    run_task(model, opt, x, y)
    opt.meta_step()
    st.save_model(model, str(tmp_path / "m.safetensors"))  # refused ("shared tensors") before
    st.save_file(model.state_dict(), str(tmp_path / "sd.safetensors"))
    expected = model.state_dict()
    for name in ("m.safetensors", "sd.safetensors"):
        loaded = st.load_file(str(tmp_path / name))
        assert loaded.keys() == expected.keys()
        for k, v in expected.items():
            assert torch.equal(loaded[k], v)
    other = make_model(seed=5)
    ReptileOptimizer(other.parameters(), lr=0.1)
    st.load_model(other, str(tmp_path / "m.safetensors"))
    assert all(torch.equal(a, b) for a, b in zip(other.parameters(), model.parameters()))


# ----------------------------------------------------------------- Accelerate


def test_accelerate_save_model_save_state_load_state(tmp_path):
    accelerate = pytest.importorskip("accelerate")
    st = pytest.importorskip("safetensors.torch")
    accelerator = accelerate.Accelerator(cpu=True)
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), "adam", lr=0.01, meta_lr=0.5)
    model, accelerated = accelerator.prepare(model, opt)
    reptile = accelerated.optimizer  # the ReptileOptimizer: task()/meta_step() live there
    assert reptile is opt
    data = batches(4)
    for x, y in data[:2]:
        with reptile.task():
            for _ in range(2):
                accelerated.zero_grad()
                accelerator.backward(F.mse_loss(model(x), y))
                accelerated.step()
    reptile.meta_step()

    accelerator.save_model(model, str(tmp_path / "model"))
    saved = st.load_file(str(tmp_path / "model" / "model.safetensors"))
    assert saved.keys() == model.state_dict().keys()  # nothing dropped as a "shared tensor"
    accelerator.save_state(str(tmp_path / "state"))
    expected_params, expected_opt = params(model), copy.deepcopy(opt.state_dict())

    run_task(model, reptile, *data[2])
    reptile.meta_step()
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), expected_params))
    accelerator.load_state(str(tmp_path / "state"))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), expected_params))
    loaded = opt.state_dict()
    for idx, entry in expected_opt["state"].items():
        for k, v in entry.items():
            assert torch.equal(torch.as_tensor(loaded["state"][idx][k]), torch.as_tensor(v))


# ----------------------------------------------------------------- wrappers


def test_reptile_bookkeeping_survives_a_forwarding_wrapper():
    """Lightning's LightningOptimizer subclasses the optimizer's class and forwards attribute
    reads: opt.task() through it runs with the wrapper as self.  The meta-batch must still be
    the optimizer's (checkpoint mid-meta-batch, the open-meta-batch step() check)."""
    lightning_optimizer = pytest.importorskip("lightning.pytorch.core.optimizer")
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.05, meta_lr=0.5)
    wrapper = lightning_optimizer.LightningOptimizer(opt)
    x, y = batches(1)[0]
    with wrapper.task():
        for _ in range(2):
            wrapper.zero_grad()
            F.mse_loss(model(x), y).backward()
            opt.step()
    assert opt.tasks_in_meta_batch == 1 and wrapper.tasks_in_meta_batch == 1
    assert opt.state_dict()["param_groups"][0]["tasks_in_meta_batch"] == 1
    with pytest.raises(RuntimeError, match="meta-batch is open"):
        ReptileOptimizer.step(wrapper)  # what LightningOptimizer's class would run
    with pytest.raises(RuntimeError, match="meta-batch is open"):
        opt.step()
    assert wrapper.meta_optimizer is opt.meta_optimizer
    wrapper.meta_step()
    assert opt.tasks_in_meta_batch == 0


class _CopyingWrapper:
    """What older Lightning releases did: copy the optimizer's __dict__ and subclass its class."""

    def __init__(self, optimizer):
        self.__dict__ = {k: v for k, v in optimizer.__dict__.items() if k not in ("step", "__del__")}
        self._optimizer = optimizer
        self.__class__ = type("Copying" + type(optimizer).__name__, (type(self), type(optimizer)), {})

    def step(self, closure=None):
        return self._optimizer.step(closure)


def test_reptile_bookkeeping_survives_a_dict_copying_wrapper():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.05, meta_lr=0.5)
    wrapper = _CopyingWrapper(opt)
    x, y = batches(1)[0]
    run_task(model, wrapper, x, y)
    assert opt.tasks_in_meta_batch == 1
    with pytest.raises(RuntimeError, match="meta-batch is open"):
        ReptileOptimizer.step(wrapper)
    restored = ReptileOptimizer(make_model(seed=2).parameters(), lr=0.05, meta_lr=0.5)
    restored.load_state_dict(opt.state_dict())
    assert restored.tasks_in_meta_batch == 1
    wrapper.meta_step()
    assert opt.tasks_in_meta_batch == 0 and wrapper.tasks_in_meta_batch == 0


class _ReptileModule:
    """Built lazily so the module imports without Lightning."""

    @staticmethod
    def make(data, meta_batch: int, anneal_over: int):
        import lightning.pytorch as pl

        class ReptileModule(pl.LightningModule):
            def __init__(self):
                super().__init__()
                self.automatic_optimization = False  # Reptile's loop is the training step
                self.net = make_model()

            def training_step(self, batch, batch_idx):
                opt = self.optimizers()  # a LightningOptimizer: task()/meta_step() work through it
                x, y = batch[0][0], batch[1][0]
                with opt.task():
                    for _ in range(2):
                        opt.zero_grad()
                        self.manual_backward(F.mse_loss(self.net(x), y))
                        opt.step()
                if opt.tasks_in_meta_batch == meta_batch:
                    opt.meta_step()
                    self.lr_schedulers().step()

            def configure_optimizers(self):
                opt = ReptileOptimizer(self.net.parameters(), lr=0.05, meta_lr=1.0)
                sched = torch.optim.lr_scheduler.LinearLR(
                    opt.meta_optimizer, start_factor=1.0, end_factor=0.0, total_iters=anneal_over
                )
                return {"optimizer": opt, "lr_scheduler": MetaLRScheduler(sched)}

            def train_dataloader(self):
                xs = torch.stack([x for x, _ in data])
                ys = torch.stack([y for _, y in data])
                return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(xs, ys), batch_size=1)

        return ReptileModule()


def test_lightning_manual_optimization_with_meta_lr_annealing(tmp_path):
    pl = pytest.importorskip("lightning.pytorch")
    data = batches(6)
    module = _ReptileModule.make(data, meta_batch=2, anneal_over=3)
    trainer = pl.Trainer(
        max_epochs=1, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
    )  # fmt: skip
    trainer.fit(module)

    # The same run without Lightning.
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), lr=0.05, meta_lr=1.0)
    sched = torch.optim.lr_scheduler.LinearLR(opt.meta_optimizer, 1.0, 0.0, total_iters=3)
    for i, (x, y) in enumerate(data):
        run_task(model, opt, x, y)
        if i % 2 == 1:
            opt.meta_step()
            sched.step()
    for a, b in zip(module.net.parameters(), model.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert trainer.optimizers[0].param_groups[0]["meta_lr"] == pytest.approx(0.0)
    assert trainer.optimizers[0].param_groups[0]["lr"] == 0.05  # the inner lr is not annealed


def test_lightning_checkpoint_mid_meta_batch_resumes_exactly(tmp_path):
    """A Lightning checkpoint taken between the tasks of a meta-batch keeps the finished
    tasks: the resumed run is the uninterrupted one, bit for bit."""
    pl = pytest.importorskip("lightning.pytorch")
    data = batches(3)  # meta-batches of 2 over 3 tasks per epoch: epoch 1 ends mid-meta-batch

    def trainer(epochs):
        return pl.Trainer(
            max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
            enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
        )  # fmt: skip

    whole = _ReptileModule.make(data, meta_batch=2, anneal_over=4)
    trainer(2).fit(whole)

    first = _ReptileModule.make(data, meta_batch=2, anneal_over=4)
    t = trainer(1)
    t.fit(first)
    assert t.optimizers[0].tasks_in_meta_batch == 1
    t.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = _ReptileModule.make(data, meta_batch=2, anneal_over=4)
    trainer(2).fit(resumed, ckpt_path=tmp_path / "mid.ckpt")
    for a, b in zip(resumed.net.parameters(), whole.net.parameters()):
        assert torch.equal(a, b)


def test_meta_lr_scheduler_refuses_a_scheduler_of_another_optimizer():
    model = make_model()
    sgd = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(TypeError, match="meta_optimizer"):
        MetaLRScheduler(torch.optim.lr_scheduler.LinearLR(sgd, 1.0, 0.0, total_iters=3))


# ----------------------------------------------------------------- torch.distributed.checkpoint


@pytest.mark.parametrize("inner", ["sgd", "adam"])
@pytest.mark.parametrize("mid_meta_batch", [False, True])
def test_dcp_get_set_optimizer_state_dict_round_trip(inner, mid_meta_batch):
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    kwargs = dict(lr=0.02, meta_lr=0.5, momentum=0.9) if inner == "sgd" else dict(lr=0.01, meta_lr=0.5)
    data = batches(4)
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), inner, **kwargs)
    run_task(model, opt, *data[0])
    opt.meta_step()
    run_task(model, opt, *data[1])
    if not mid_meta_batch:
        opt.meta_step()
    osd = get_optimizer_state_dict(model, opt)
    assert set(osd) == {"state", "param_groups"}  # DCP keeps nothing else

    other = make_model(seed=3)
    other_opt = ReptileOptimizer(other.parameters(), inner, **kwargs)
    other.load_state_dict(model.state_dict())
    set_optimizer_state_dict(other, other_opt, osd)
    assert other_opt.tasks_in_meta_batch == opt.tasks_in_meta_batch
    for m, o in ((model, opt), (other, other_opt)):
        run_task(m, o, *data[2])
        o.meta_step()
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)


def test_dcp_save_load_files(tmp_path):
    """dcp.load fills the template it is given; a fresh optimizer's template has every key,
    after meta_step() and mid-meta-batch alike (tests/test_dcp.py runs every recipe and phase)."""
    dcp = pytest.importorskip("torch.distributed.checkpoint")
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    data = batches(4)

    def fresh(seed):
        model = make_model(seed)
        return model, ReptileOptimizer(model.parameters(), "adam", lr=0.01, meta_lr=0.5)

    def save(model, opt, where):
        dcp.save({"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}, checkpoint_id=where)

    def load(model, opt, where):
        sd = {"model": model.state_dict(), "optim": get_optimizer_state_dict(model, opt)}
        dcp.load(sd, checkpoint_id=where)
        model.load_state_dict(sd["model"])
        set_optimizer_state_dict(model, opt, sd["optim"])

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "torch.distributed is ... uninitialized"
        model, opt = fresh(0)
        run_task(model, opt, *data[0])
        opt.meta_step()
        save(model, opt, tmp_path / "closed")
        run_task(model, opt, *data[1])
        save(model, opt, tmp_path / "open")
        closed, closed_opt = fresh(3)
        load(closed, closed_opt, tmp_path / "closed")
        run_task(closed, closed_opt, *data[1])
        opened, opened_opt = fresh(4)
        load(opened, opened_opt, tmp_path / "open")
        assert opened_opt.tasks_in_meta_batch == 1
        for m, o in ((model, opt), (closed, closed_opt), (opened, opened_opt)):
            run_task(m, o, *data[2])
            o.meta_step()
        for a, b, c in zip(model.parameters(), closed.parameters(), opened.parameters()):
            assert torch.equal(a, b) and torch.equal(a, c)


def test_state_dict_without_reptile_section_is_checked_like_one_with_it():
    model = make_model()
    opt = ReptileOptimizer(model.parameters(), "adam", lr=0.01)
    run_task(model, opt, *batches(1)[0])
    sd = opt.state_dict()
    sgd = ReptileOptimizer(make_model().parameters(), "sgd", lr=0.01, momentum=0.9)
    with pytest.raises(ValueError, match="inner_optimizer='adam'"):
        sgd.load_state_dict({"state": sd["state"], "param_groups": sd["param_groups"]})
    # A checkpoint in the existing format (the count only in the 'reptile' section) still loads.
    legacy = copy.deepcopy(sd)
    for group in legacy["param_groups"]:
        del group["tasks_in_meta_batch"]
    again = ReptileOptimizer(make_model().parameters(), "adam", lr=0.01)
    again.load_state_dict(legacy)
    assert again.tasks_in_meta_batch == 1
    # Without the count anywhere, a mid-meta-batch anchor is refused rather than guessed.
    del legacy["reptile"]
    with pytest.raises(ValueError, match="tasks_in_meta_batch"):
        ReptileOptimizer(make_model().parameters(), "adam", lr=0.01).load_state_dict(legacy)


# ----------------------------------------------------------------- torch.compile


def test_compiled_step_traces_whole_and_matches_eager():
    data = batches(3)

    def run(compiled: bool, backend: str):
        model = make_model()
        opt = ReptileOptimizer(model.parameters(), "sgd", lr=0.05, momentum=0.9, backend=backend)
        step = torch.compile(opt.step, fullgraph=True, backend="eager") if compiled else opt.step
        with opt.task():
            for x, y in data:
                opt.zero_grad()
                F.mse_loss(model(x), y).backward()
                step()
        opt.meta_step()
        return params(model)

    for backend in available_backends("cpu"):
        if backend == "triton":
            continue  # the interpreter's kernels are not traceable (nothing to compile on the CPU)
        torch._dynamo.reset()
        for a, b in zip(run(True, backend), run(False, backend)):
            assert torch.equal(a, b), backend
