"""torch.distributed.checkpoint with FSDP2 parameters: the DCP tutorial's AppState recipe
(a fresh model and optimizer as the load template) resumes a sharded ReptileOptimizer,
in the middle of a meta-batch bit-exactly, and in another world size."""

import os

import pytest
import torch

from reptile_fused import ReptileOptimizer
from test_distributed import _finish, _init, spawn
from test_fsdp import ROWS, all_tasks, full_weights, make_model, sharded_model, train

pytest.importorskip("torch.distributed.checkpoint.state_dict")
CONFIG = dict(inner_optimizer="adam", lr=0.01, meta_lr=0.8, amsgrad=True)  # carried state: one task group


class AppState:
    """The DCP tutorial's Stateful wrapper: what dcp.save writes and dcp.load fills in place."""

    def __init__(self, model, opt):
        self.model, self.opt = model, opt

    def state_dict(self):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.opt)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, sd):
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(self.model, self.opt, model_state_dict=sd["model"], optim_state_dict=sd["optim"])


def _setup(world):
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (world,))
    part = ROWS // world
    rows = slice(mesh.get_local_rank() * part, (mesh.get_local_rank() + 1) * part)
    model = sharded_model(mesh)
    return model, ReptileOptimizer(model.parameters(), **CONFIG), rows


def _tasks_of_iteration_1(opt, model, rows, which):
    tasks = all_tasks()[1]
    train(model, _NoMetaStep(opt), [tasks[which]], rows)


class _NoMetaStep:
    """``opt`` whose meta_step() is left for later: tasks of a meta-batch run in pieces."""

    def __init__(self, opt):
        self.opt = opt

    def __getattr__(self, name):
        return (lambda: None) if name == "meta_step" else getattr(self.opt, name)


def _worker_save(rank, world, port, out_dir):
    import torch.distributed.checkpoint as dcp

    _init(rank, world, port)
    try:
        model, opt, rows = _setup(world)
        train(model, opt, all_tasks()[:1], rows)
        _tasks_of_iteration_1(opt, model, rows, slice(0, 2))  # 2 of the meta-batch's 3 tasks
        dcp.save({"app": AppState(model, opt)}, checkpoint_id=os.path.join(out_dir, "mid"))
        if rank == 0:  # what a sharded optimizer's own state_dict holds, mid-meta-batch
            entries = {i: {k: (type(v).__name__, tuple(v.shape)) if isinstance(v, torch.Tensor) else (None, None)
                           for k, v in e.items()} for i, e in opt.state_dict()["state"].items()}
            torch.save(entries, os.path.join(out_dir, "entries.pt"))
        _tasks_of_iteration_1(opt, model, rows, slice(2, 3))
        opt.meta_step()
        dcp.save({"app": AppState(model, opt)}, checkpoint_id=os.path.join(out_dir, "end"))
        train(model, opt, all_tasks()[2:], rows)
        weights = full_weights(model)  # a collective: every rank takes part
        if rank == 0:
            torch.save(weights, os.path.join(out_dir, "uninterrupted.pt"))
        _resume(rank, world, out_dir, "mid")  # a fresh model and optimizer, in the same processes
    finally:
        _finish()


def _worker_resume(rank, world, port, out_dir, phase):
    _init(rank, world, port)
    try:
        _resume(rank, world, out_dir, phase)
    finally:
        _finish()


def _resume(rank, world, out_dir, phase):
    import torch.distributed.checkpoint as dcp

    model, opt, rows = _setup(world)
    dcp.load({"app": AppState(model, opt)}, checkpoint_id=os.path.join(out_dir, phase))
    if phase == "mid":
        assert opt.tasks_in_meta_batch == 2
        _tasks_of_iteration_1(opt, model, rows, slice(2, 3))
        opt.meta_step()
    train(model, opt, all_tasks()[2:], rows)
    weights = full_weights(model)
    if rank == 0:
        torch.save(weights, os.path.join(out_dir, f"resumed_{phase}_world{world}.pt"))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    out = tmp_path_factory.mktemp("fsdp_dcp")
    spawn(_worker_save, 2, str(out))
    return out


def test_dcp_resumes_mid_meta_batch_bit_exactly(saved):
    want = torch.load(saved / "uninterrupted.pt", weights_only=True)
    got = torch.load(saved / "resumed_mid_world2.pt", weights_only=True)
    for key, value in want.items():
        assert torch.equal(got[key], value), key


def test_dcp_saved_by_two_ranks_resumes_on_one(saved):
    spawn(_worker_resume, 1, str(saved), "end")
    want = torch.load(saved / "uninterrupted.pt", weights_only=True)
    got = torch.load(saved / "resumed_end_world1.pt", weights_only=True)
    # One rank computes each batch's gradient whole, two ranks average halves: rounding only.
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-10, msg=key)
    assert any(not torch.equal(value, make_model().state_dict()[key]) for key, value in want.items())


def test_sharded_state_dict_entries_are_dtensors_shaped_like_their_parameters(saved):
    entries = torch.load(saved / "entries.pt", weights_only=True)
    shapes = [tuple(p.shape) for p in make_model().parameters()]
    assert len(entries) == len(shapes)
    for index, entry in entries.items():
        assert {"exp_avg", "exp_avg_sq", "max_exp_avg_sq", "anchor", "task_sum"} <= set(entry), entry
        for key, (kind, shape) in entry.items():
            if key != "step":
                assert (kind, shape) == ("DTensor", shapes[index]), (index, key)
