"""ReptileOptimizer on FSDP2 (``fully_shard``) parameters, gloo on the CPU, float64.

Every sharded run must equal one process stepping the unsharded model on the same tasks:
1-D FSDP over 2 ranks (every rank runs every task on its half of each batch), and a 2 x 2
tasks x shards mesh over 4 ranks (each row of the mesh takes its share of the meta-batch,
the meta step sums over the "tasks" dimension only).
"""

import os

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from reptile_fused import ReptileOptimizer
from reptile_fused.distributed import shard
from test_distributed import _finish, _init, spawn

pytest.importorskip("torch.distributed.fsdp")
if not dist.is_available():
    pytest.skip("torch.distributed is not available", allow_module_level=True)

ITERATIONS = 2
TASKS = 3  # odd: the 2 x 2 mesh's task groups get 2 and 1
STEPS = 2
ROWS = 4
TOL = dict(rtol=0, atol=1e-10)

CONFIGS = {
    "sgd": dict(inner_optimizer="sgd", lr=0.1, meta_lr=0.7),
    # check_finite: the shard group's ranks agree on every check (one all-reduce each).
    "sgd_momentum": dict(inner_optimizer="sgd", lr=0.05, meta_lr=0.7, momentum=0.9, reset_inner_state="task",
                         check_finite=True),
    "adam": dict(inner_optimizer="adam", lr=0.01, meta_lr=1.0, betas=(0.0, 0.999), reset_inner_state="task"),
    "adam_fused_amsgrad": dict(inner_optimizer="adam", lr=0.01, meta_lr=0.5, amsgrad=True, fused=True,
                               reset_inner_state="task"),
    "fomaml_sgd": dict(inner_optimizer="sgd", lr=0.1, meta_lr=0.5, algorithm="fomaml"),
    "fomaml_adam": dict(inner_optimizer="adam", lr=0.01, meta_lr=0.5, algorithm="fomaml", reset_inner_state="task"),
}
# One task group only (1-D FSDP): carried inner state is the single process's too.
CARRIED = {"adam_carried": dict(inner_optimizer="adam", lr=0.01, meta_lr=0.8, weight_decay=0.01)}


def make_model():
    torch.manual_seed(0)
    # Row counts 7, 5 and 1: uneven shards, and a rank that holds no row of the last layer.
    return nn.Sequential(nn.Linear(3, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1)).double()


def all_tasks():
    g = torch.Generator().manual_seed(3)
    return [[[(torch.randn(ROWS, 3, generator=g, dtype=torch.float64), torch.randn(ROWS, 1, generator=g,
                                                                                   dtype=torch.float64))
              for _ in range(STEPS)] for _ in range(TASKS)] for _ in range(ITERATIONS)]  # fmt: skip


def train(model, opt, tasks, rows=slice(None), outer=None):
    """With ``outer`` (a torch optimizer) the meta step is ``opt.meta_gradient(); outer.step()``."""
    for meta_batch in tasks:
        for task in meta_batch:
            with opt.task():
                for x, y in task:
                    opt.zero_grad()
                    F.mse_loss(model(x[rows]), y[rows]).backward()
                    opt.step()
        if outer is None:
            opt.meta_step()
        else:
            opt.meta_gradient()
            outer.step()


def sharded_model(mesh):
    from torch.distributed.fsdp import fully_shard

    model = make_model()
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    return fully_shard(model, mesh=mesh)


def full_weights(model):
    return {k: v.full_tensor() for k, v in model.state_dict().items()}


def _worker(rank, world, port, out_dir):
    _init(rank, world, port)
    try:
        from torch.distributed.device_mesh import init_device_mesh

        if world == 2:
            mesh, task_rank, task_groups = init_device_mesh("cpu", (2,)), 0, 1
            configs = {**CONFIGS, **CARRIED}
        else:
            mesh2d = init_device_mesh("cpu", (2, 2), mesh_dim_names=("tasks", "shard"))
            mesh, task_rank, task_groups = mesh2d["shard"], mesh2d["tasks"].get_local_rank(), 2
            configs = CONFIGS
        # Within a shard group every rank runs the same task on its share of each batch;
        # FSDP's reduce-scatter averages those shares' gradients into the whole batch's.
        part = ROWS // mesh.size()
        rows = slice(mesh.get_local_rank() * part, (mesh.get_local_rank() + 1) * part)
        results = {}
        if world == 4:  # the task group named explicitly, as the mesh's "tasks" dimension
            configs = {**configs, "sgd_explicit_group": dict(CONFIGS["sgd"], process_group=mesh2d["tasks"])}
        for name, config in configs.items():
            model = sharded_model(mesh)
            opt = ReptileOptimizer(model.parameters(), **config)
            assert (opt._sync is None) == (task_groups == 1), name
            if opt._sync is not None:
                assert dist.get_process_group_ranks(opt._sync.group) == [mesh.get_local_rank(), 2 + mesh.get_local_rank()]
            train(model, opt, [shard(ts, task_rank, task_groups) for ts in all_tasks()], rows)
            results[name] = full_weights(model)
        if world == 2:  # meta_gradient() writes DTensor gradients a torch optimizer steps with
            model = sharded_model(mesh)
            opt = ReptileOptimizer(model.parameters(), **CONFIGS["sgd"])
            train(model, opt, all_tasks(), rows, outer=torch.optim.SGD(model.parameters(), lr=CONFIGS["sgd"]["meta_lr"]))
            results["sgd_meta_gradient"] = full_weights(model)
        torch.save(results, os.path.join(out_dir, f"world{world}_rank{rank}.pt"))
        if world == 2:  # more cases in the same processes: each process group costs seconds to start
            _refusals(rank, world, out_dir)
            _eval_forward(rank, world, out_dir)
    finally:
        _finish()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """``runs(world)``: the folder and per-rank results of the spawned run with that many ranks (made once)."""
    done = {}

    def run(world):
        if world not in done:
            out = tmp_path_factory.mktemp(f"fsdp{world}")
            spawn(_worker, world, str(out))
            done[world] = out, [torch.load(out / f"world{world}_rank{r}.pt", weights_only=True) for r in range(world)]
        return done[world]

    return run


def oracle(config):
    model = make_model()
    train(model, ReptileOptimizer(model.parameters(), **config, process_group=False), all_tasks())
    return model.state_dict()


@pytest.mark.parametrize("name", [*CONFIGS, *CARRIED, "sgd_explicit_group", "sgd_meta_gradient"])
@pytest.mark.parametrize("world", [2, 4], ids=["fsdp_1d_2ranks", "tasks_x_shards_2x2"])
def test_sharded_equals_one_process(runs, world, name):
    _, results = runs(world)
    if name not in results[0]:
        pytest.skip("carried inner state is per task group: only the 1-D run has one group" if name in CARRIED
                    else "an explicit task group: only the 2 x 2 mesh has one" if name == "sgd_explicit_group"
                    else "meta_gradient: run on the 1-D mesh")
    expected = oracle({**CONFIGS, **CARRIED}.get(name, CONFIGS["sgd"]))
    for rank, result in enumerate(results):
        for key, value in expected.items():
            torch.testing.assert_close(result[name][key], value, **TOL, msg=f"rank {rank} {key}")
    moved = any(not torch.equal(results[0][name][k], v) for k, v in make_model().state_dict().items())
    assert moved, "training changed nothing: the comparison would pass vacuously"


def _refusals(rank, world, out_dir):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, distribute_tensor

    mesh = init_device_mesh("cpu", (world,))
    messages = []
    replicated = nn.Parameter(distribute_tensor(torch.zeros(4, 2), mesh, [Replicate()]))
    model = sharded_model(mesh)
    for params in ([replicated], [*model.parameters(), nn.Parameter(torch.zeros(3))]):
        try:
            ReptileOptimizer(params, lr=0.1)
            messages.append("accepted")
        except ValueError as exc:
            messages.append(str(exc))
    torch.save(messages, os.path.join(out_dir, f"refusals{rank}.pt"))


def test_other_placements_and_mixed_groups_are_refused(runs):
    out, _ = runs(2)
    replicated, mixed = torch.load(out / "refusals0.pt")
    assert "placements (Replicate(),)" in replicated and "tensor parallel" in replicated
    assert "plain tensor in a param group of FSDP2" in mixed


def _worker_nccl(rank, world, port, out_dir):
    import datetime

    torch.cuda.set_device(rank)
    dist.init_process_group("nccl", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))  # fmt: skip
    try:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cuda", (world,))
        part = ROWS // world
        rows = slice(rank * part, (rank + 1) * part)
        results = {}
        for name in ("sgd", "adam", "fomaml_adam"):
            model = make_model().cuda()
            for layer in model:
                if isinstance(layer, nn.Linear):
                    fully_shard(layer, mesh=mesh)
            fully_shard(model, mesh=mesh)
            opt = ReptileOptimizer(model.parameters(), **CONFIGS[name])
            tasks = [[[(x.cuda(), y.cuda()) for x, y in task] for task in ts] for ts in all_tasks()]
            train(model, opt, tasks, rows)
            results[name] = {k: v.cpu() for k, v in full_weights(model).items()}
        torch.save(results, os.path.join(out_dir, f"nccl{rank}.pt"))
    finally:
        dist.barrier()
        dist.destroy_process_group()


@pytest.mark.gpu
def test_fsdp_on_two_gpus_with_nccl_equals_one_process(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs a second GPU")
    spawn(_worker_nccl, 2, str(tmp_path), start_method="spawn")
    results = torch.load(tmp_path / "nccl0.pt")
    for name, weights in results.items():
        for key, value in oracle(CONFIGS[name]).items():
            # cuBLAS and the CPU round matrix products differently: float64 keeps that far below 1e-10
            torch.testing.assert_close(weights[key], value, **TOL, msg=f"{name} {key}")


def _eval_forward(rank, world, out_dir):
    """A forward under no_grad leaves FSDP's root unsharded; what the optimizer writes next
    (a rolled-back task, a task end, a meta step, an inner step) must reach the next forward."""
    from torch.distributed.device_mesh import init_device_mesh

    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh("cpu", (world,))
    model = make_model()
    fully_shard(model[0], mesh=mesh)
    fully_shard(model, mesh=mesh)  # the root holds the last two layers itself
    opt = ReptileOptimizer(model.parameters(), lr=0.5, meta_lr=0.5)
    x = torch.linspace(-1, 1, 12, dtype=torch.float64).view(4, 3)
    with torch.no_grad():
        theta = model(x)  # the root stays unsharded from here
    seen = {}
    try:
        with opt.task():
            opt.zero_grad()
            F.mse_loss(model(x), torch.zeros(4, 1, dtype=torch.float64)).backward()
            opt.step()
            with torch.no_grad():
                seen["adapted"] = model(x)
            raise KeyError("roll back")
    except KeyError:
        pass
    with torch.no_grad():
        seen["after_rollback"] = model(x)
    with opt.task():
        opt.zero_grad()
        F.mse_loss(model(x), torch.zeros(4, 1, dtype=torch.float64)).backward()
        opt.step()
        with torch.no_grad():
            seen["adapted_again"] = model(x)
    with torch.no_grad():
        seen["after_task"] = model(x)
    opt.meta_step()
    with torch.no_grad():
        seen["after_meta_step"] = model(x)
    torch.save({"theta": theta, **seen}, os.path.join(out_dir, f"eval{rank}.pt"))


def test_writes_reach_the_next_forward_after_a_forward_without_backward(runs):
    out, _ = runs(2)
    for rank in range(2):
        seen = torch.load(out / f"eval{rank}.pt", weights_only=True)
        theta, adapted = seen["theta"], seen["adapted"]
        assert not torch.equal(adapted, theta), "the inner step did not reach the forward"
        assert torch.equal(seen["after_rollback"], theta)
        assert torch.equal(seen["adapted_again"], adapted)
        assert torch.equal(seen["after_task"], theta)
        # meta_lr 0.5 of one task: halfway between θ and the adapted weights, a new output
        assert not torch.equal(seen["after_meta_step"], theta)
        assert not torch.equal(seen["after_meta_step"], adapted)
