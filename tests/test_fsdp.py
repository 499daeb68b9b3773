"""FSDP2 (train.parallel=fsdp), activation checkpointing, sharded checkpoints, multi-node launch and
the memory planner. The multi-process tests run torchrun with gloo on CPU, like tests/test_ddp.py."""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmforge.cli import main

TORCHRUN = [sys.executable, "-m", "torch.distributed.run"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
# every step is in warmup (micro: 10 warmup steps), so a run cut at step 4 and resumed has the lr of an
# uninterrupted 8-step run; mid_fraction=0: chat rows' masked mean is per rank (not exact under DDP/FSDP)
STEPS = ["--set", "pretrain.log_every=1", "--set", "pretrain.eval_every=0", "--set", "pretrain.dtype=fp32",
         "--set", "pretrain.ckpt_every=0", "--set", "pretrain.mid_fraction=0"]
FSDP = ["--set", "pretrain.parallel=fsdp"]


def losses(run_dir) -> dict[int, float]:
    recs = [json.loads(line) for line in open(Path(run_dir) / "metrics.jsonl")]
    return {r["step"]: r["loss"] for r in recs if r.get("stage") == "pretrain" and "loss" in r}


def fresh_copy(prepared: Path, dest: Path) -> Path:
    shutil.copytree(prepared, dest)
    os.remove(dest / "metrics.jsonl")
    return dest


def torchrun(args, *launch, timeout=300):
    launch = launch or ("--standalone", "--nproc_per_node=2")
    proc = subprocess.run([*TORCHRUN, *launch, "-m", "llmforge.cli", *args], env=ENV, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]


@pytest.fixture(scope="module")
def micro(tmp_path_factory):
    """A prepared micro run and the single-process 8-step loss curve (batch 16) on it."""
    root = tmp_path_factory.mktemp("fsdp")
    prepared = root / "prepared"
    assert main(["data", "prepare", "--out", str(prepared), "--preset", "micro"]) == 0
    single = fresh_copy(prepared, root / "single")
    assert main(["pretrain", "--out", str(single), *STEPS, "--set", "pretrain.max_steps=8",
                 "--set", "pretrain.batch_size=16"]) == 0
    return prepared, losses(single)


# ---------------------------------------------------------------- one process

def test_activation_checkpointing_keeps_names_loss_and_grads(tiny_model_cfg):
    from llmforge.model.transformer import Transformer
    from llmforge.train.distributed import checkpoint_blocks
    torch.manual_seed(0)
    plain = Transformer(tiny_model_cfg)
    recomputed = Transformer(tiny_model_cfg)
    recomputed.load_state_dict(plain.state_dict())
    checkpoint_blocks(recomputed)
    assert [n for n, _ in recomputed.named_parameters()] == [n for n, _ in plain.named_parameters()]
    x = torch.randint(0, tiny_model_cfg.vocab_size, (2, 16))
    for m in (plain, recomputed):
        m(x, targets=x)[1].backward()
    assert recomputed(x, targets=x)[1].item() == pytest.approx(plain(x, targets=x)[1].item(), abs=1e-6)
    for (name, a), b in zip(plain.named_parameters(), recomputed.parameters()):
        assert torch.allclose(a.grad, b.grad, atol=1e-6), name


def test_plan_memory_matches_a_hand_computation(tiny_model_cfg):
    """vocab 97, 2 layers, d 32, 4 heads (head 8), 2 kv heads, SwiGLU 128, tied head, on 2 ranks:
    FSDP2 gives each rank ceil(rows / 2) rows of every parameter."""
    from llmforge.config import TrainConfig
    from llmforge.train.memory import plan_memory
    embed, norm = 49 * 32, 16                                  # 97 rows -> 49 per rank (padded)
    block = 2 * norm + 16 * 32 + 8 * 32 * 2 + 16 * 32 + 3 * (64 * 32)  # norms, q, k+v, o, gate/up (128x32) and down (32x128)
    per_rank = embed + 2 * block + norm
    assert per_rank == 17008
    tc = TrainConfig(batch_size=2, seq_len=8)
    fsdp = plan_memory(tiny_model_cfg, tc, "fsdp", 2)
    assert (fsdp.params, fsdp.grads, fsdp.optimizer, fsdp.buffers) == (4 * per_rank, 4 * per_rank, 8 * per_rank, 0)
    whole_block = 2 * 32 + 32 * 32 + 2 * 16 * 32 + 32 * 32 + 3 * 128 * 32
    root = 97 * 32 + 32                                         # embedding (= head) and final norm, gathered all step
    assert fsdp.gathered == 4 * (root + 2 * whole_block) + 4 * whole_block
    ddp = plan_memory(tiny_model_cfg, tc, "ddp", 2)
    total = 97 * 32 + 2 * whole_block + 32
    assert (ddp.params, ddp.grads, ddp.optimizer, ddp.buffers, ddp.gathered) == (4 * total, 4 * total, 8 * total,
                                                                                 4 * total, 0)
    muon = plan_memory(tiny_model_cfg, dataclass_replace(tc, optimizer="muon"), "ddp", 1)
    hidden = 2 * (whole_block - 2 * 32)                         # the blocks' matrices: one momentum each
    assert muon.optimizer == 4 * hidden + 8 * (total - hidden)
    # activations: with checkpointing each block keeps its input (B*T*d fp32) and one block's come back
    from llmforge.model.transformer import Transformer
    from llmforge.train.memory import saved_activation_bytes
    B, T = 2, 8
    with torch.device("meta"):
        outside, per_block, block_input = saved_activation_bytes(Transformer(tiny_model_cfg), B, T)
    assert block_input == B * T * 32 * 4 and per_block[0] == per_block[1] > 8 * block_input
    assert outside >= B * T * 97 * 4                            # at least the logits' log-softmax
    assert fsdp.activations_full == outside + 2 * per_block[0]
    assert fsdp.activations_checkpointed == outside + 2 * block_input + per_block[0]
    ac = plan_memory(tiny_model_cfg, dataclass_replace(tc, activation_checkpointing=True), "fsdp", 2)
    assert ac.activations == fsdp.activations_checkpointed


def dataclass_replace(obj, **kw):
    import dataclasses
    return dataclasses.replace(obj, **kw)


def test_plan_memory_cli_says_whether_it_fits(capsys):
    assert main(["plan-memory", "--preset", "micro", "--parallel", "fsdp", "--world", "4", "--gpu-memory", "1GiB"]) == 0
    out = capsys.readouterr().out
    assert "fits in 1.0 GiB" in out and "activation checkpointing on" in out
    assert main(["plan-memory", "--preset", "micro", "--gpu-memory", "lots"]) == 2
    assert "--gpu-memory 'lots' is not a size" in capsys.readouterr().err


def test_unknown_parallel_is_a_one_line_error(tmp_path):
    sys.path.insert(0, str(Path(__file__).parent))
    import fsdp_worker
    from llmforge.errors import UserError
    from llmforge.train.distributed import DistContext
    with pytest.raises(UserError, match="parallel='zero3' is not one of ddp, fsdp"):
        fsdp_worker.run(tmp_path, "muon", DistContext(), "zero3")


# ---------------------------------------------------------------- torchrun

@pytest.mark.slow
def test_fsdp_matches_single_process_and_resumes_on_other_world_sizes(micro, tmp_path):
    prepared, single = micro
    whole = fresh_copy(prepared, tmp_path / "whole")
    torchrun(["pretrain", "--out", str(whole), *STEPS, *FSDP, "--set", "pretrain.max_steps=8",
              "--set", "pretrain.batch_size=8"])
    fsdp = losses(whole)
    assert sorted(fsdp) == list(range(1, 9))
    for step in single:  # gloo reduces in another order than one process sums: equal up to rounding
        assert fsdp[step] == pytest.approx(single[step], rel=1e-4), step

    # sharded save on 2 ranks at step 4 ...
    cut = fresh_copy(prepared, tmp_path / "cut")
    torchrun(["pretrain", "--out", str(cut), *STEPS, *FSDP, "--set", "pretrain.max_steps=4",
              "--set", "pretrain.batch_size=8"])
    ckpt = cut / "ckpt" / "base"
    assert (ckpt / "sharded" / ".metadata").is_file() and len(list((ckpt / "sharded").glob("*.distcp"))) == 2
    one = tmp_path / "one"
    shutil.copytree(cut, one)
    # ... resumed on 2 ranks: the uninterrupted 2-rank run's losses, exactly
    torchrun(["pretrain", "--out", str(cut), *STEPS, *FSDP, "--set", "pretrain.max_steps=8",
              "--set", "pretrain.batch_size=8", "--resume"])
    resumed = losses(cut)
    assert [resumed[s] for s in range(5, 9)] == [fsdp[s] for s in range(5, 9)]
    # ... and on 1 process (the same global batch): the curve continues
    assert main(["pretrain", "--out", str(one), *STEPS, *FSDP, "--set", "pretrain.max_steps=8",
                 "--set", "pretrain.batch_size=16", "--resume"]) == 0
    resumed = losses(one)
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(single[step], rel=1e-4), step

    # the whole weights of a sharded checkpoint: written at the end, and by `llmforge consolidate`
    from safetensors.torch import load_file
    from llmforge.errors import UserError
    from llmforge.train.checkpoint import load_model
    final = load_file(str(ckpt / "model.safetensors"))
    os.remove(ckpt / "model.safetensors")
    with pytest.raises(UserError, match="llmforge consolidate"):
        load_model(ckpt)
    assert main(["consolidate", str(ckpt)]) == 0
    assert load_file(str(ckpt / "model.safetensors")).keys() == final.keys()
    model, config, _ = load_model(ckpt)
    assert config["step"] == 8 and all(torch.equal(final[k], load_file(str(ckpt / "model.safetensors"))[k])
                                       for k in final)


KILL_ON_SECOND_SAVE = """
import os, signal, sys
from torch.distributed.checkpoint import FileSystemWriter
write = FileSystemWriter.write_data
calls = []
def write_then_die(self, plan, planner):
    calls.append(1)
    out = write(self, plan, planner)
    if len(calls) == 2:  # the shards of the step-4 checkpoint are on disk, its metadata is not
        os.kill(os.getpid(), signal.SIGKILL)
    return out
FileSystemWriter.write_data = write_then_die
from llmforge.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_kill_9_mid_save_leaves_the_previous_checkpoint_usable(micro, tmp_path):
    prepared, single = micro
    run = fresh_copy(prepared, tmp_path / "killed")
    args = ["pretrain", "--out", str(run), *STEPS, *FSDP, "--set", "pretrain.max_steps=8",
            "--set", "pretrain.batch_size=16", "--set", "pretrain.ckpt_every=2"]
    proc = subprocess.run([sys.executable, "-c", KILL_ON_SECOND_SAVE, *args], env=ENV, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((run / "ckpt" / "base" / "train_state.json").read_text())
    assert state["step"] == 2                       # the previous checkpoint, whole
    assert main([*args, "--resume"]) == 0
    resumed = losses(run)
    assert [resumed[s] for s in range(3, 9)] == [single[s] for s in range(3, 9)]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "ddp"])
def test_sigterm_to_one_rank_stops_every_rank_at_one_step_with_a_checkpoint(micro, tmp_path, parallel):
    """Slurm's preemption signals the processes; under FSDP the save is collective, and under DDP
    a rank that left alone would hang the others' all-reduce, so the ranks agree on the step to
    stop at. The resumed run continues the curve."""
    import time
    prepared, single = micro
    run = fresh_copy(prepared, tmp_path / "term")
    args = ["pretrain", "--out", str(run), *STEPS, "--set", f"pretrain.parallel={parallel}", "--set", "pretrain.max_steps=120",
            "--set", "pretrain.batch_size=8"]   # 120: on a bf16 CPU 30 micro steps could end before the signal
    agent = subprocess.Popen([*TORCHRUN, "--standalone", "--nproc_per_node=2", "-m", "llmforge.cli", *args],
                             env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not ((run / "metrics.jsonl").is_file() and '"loss"' in (run / "metrics.jsonl").read_text()):
        assert time.time() < deadline and agent.poll() is None
        time.sleep(0.05)
    worker = int(subprocess.run(["pgrep", "-P", str(agent.pid)], capture_output=True, text=True).stdout.split()[0])
    os.kill(worker, signal.SIGTERM)
    err = agent.communicate(timeout=240)[1]
    assert agent.returncode != 0 and err.count("stopped by signal 15 at step") == 2, err[-2000:]
    stopped = json.loads((run / "ckpt" / "base" / "train_state.json").read_text())["step"]
    assert 1 <= stopped < 120 and not json.loads((run / "ckpt" / "base" / "config.json").read_text())["complete"]
    torchrun([*args, "--resume"])
    resumed = losses(run)
    assert sorted(resumed) == list(range(1, 121))
    for step in range(1, 9):  # warmup: the lr of these steps does not depend on max_steps
        assert resumed[step] == pytest.approx(single[step], rel=1e-4), step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_nodes_on_localhost_rendezvous_and_pretrain(micro, tmp_path):
    """Two torchrun agents, one process each, meeting through c10d rendezvous: what two machines run."""
    prepared, single = micro
    run = fresh_copy(prepared, tmp_path / "nodes")
    launch = ["--nnodes", "2", "--nproc-per-node", "1", "--rdzv-backend", "c10d",
              "--rdzv-endpoint", f"127.0.0.1:{free_port()}", "--rdzv-id", "llmforge-test"]
    cmd = [*TORCHRUN, *launch, "-m", "llmforge.cli", "pretrain", "--out", str(run), *STEPS, *FSDP,
           "--set", "pretrain.max_steps=4", "--set", "pretrain.batch_size=8"]
    nodes = [subprocess.Popen(cmd, env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [node.communicate(timeout=300)[1] for node in nodes]
    assert [node.returncode for node in nodes] == [0, 0], errors[0][-2000:] + errors[1][-2000:]
    two_nodes = losses(run)
    assert sorted(two_nodes) == [1, 2, 3, 4]
    for step in two_nodes:
        assert two_nodes[step] == pytest.approx(single[step], rel=1e-4), step


@pytest.mark.slow
def test_fsdp_muon_lora_and_activation_checkpointing_match_one_process(tmp_path):
    """The loop on 2 ranks with FSDP against the same loop in this process: Muon (whole matrices
    orthogonalized), LoRA (the sharded base stays frozen, adapters train), activation checkpointing."""
    from safetensors.torch import load_file
    sys.path.insert(0, str(Path(__file__).parent))
    import fsdp_worker
    from llmforge.model.transformer import Transformer
    from llmforge.train.distributed import DistContext
    scenarios = ["muon", "lora", "checkpointing"]
    proc = subprocess.run([*TORCHRUN, "--standalone", "--nproc_per_node=2", str(Path(fsdp_worker.__file__)),
                           str(tmp_path / "fsdp"), *scenarios], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]

    def curve(folder):
        return [json.loads(line)["loss"] for line in open(folder / "metrics.jsonl") if '"loss"' in line]

    for name in scenarios:
        fsdp_worker.run(tmp_path / "one", name, DistContext(), "ddp")
        ours, theirs = curve(tmp_path / "fsdp" / name), curve(tmp_path / "one" / name)
        assert len(ours) == 5 and ours == pytest.approx(theirs, rel=1e-4), name
        a = load_file(str(tmp_path / "fsdp" / name / "ckpt" / "model.safetensors"))
        b = load_file(str(tmp_path / "one" / name / "ckpt" / "model.safetensors"))
        assert a.keys() == b.keys() and all(torch.allclose(a[k], b[k], atol=1e-5) for k in a), name
    torch.manual_seed(0)
    base = Transformer(fsdp_worker.MODEL).state_dict()
    trained = load_file(str(tmp_path / "fsdp" / "lora" / "ckpt" / "model.safetensors"))
    assert all(torch.equal(trained[k], base[k]) for k in trained if k in base)   # the frozen base
    adapters = load_file(str(tmp_path / "fsdp" / "lora" / "adapters" / "test" / "adapter.safetensors"))
    assert adapters and all(".lora_" in k for k in adapters)
    assert any(k.endswith("lora_B") and adapters[k].abs().sum() > 0 for k in adapters)  # B starts at zero
