"""`grto pretrain`: build and train the embedded default's tiny base models (policy + SAM).

Stands in for downloading pretrained checkpoints: the outputs have the real checkpoints' formats
and every later stage loads them through the same loaders.
"""

from __future__ import annotations

import multiprocessing
import queue as queue_module
import shutil
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from grto_cli.core.data.records import Record, read_manifest
from grto_cli.core.checkpoint import POLICY_DIR, copy_system, save_policy, save_tool
from grto_cli.core.config import check_choice
from grto_cli.core.io import atomic_dir
from grto_cli.core.metrics import SFT_LOSS, TOOL_LOSS
from grto_cli.core.policy import Policy, load_policy
from grto_cli.core.shipped import SHIPPED_BASE, mismatches, shipped_record
from grto_cli.core.pretrain import PolicySftConfig, SamTrainConfig, train_policy_sft, train_sam
from grto_cli.core.tiny import TINY_FAMILIES, TinyVLMArch, build_tiny_vlm, tiny_sam2, tiny_sam2_hf, tiny_sam_arch
from grto_cli.core.tool import SAM_KIND, SEG_LOSSES, SamTool, Tool, build_sam
from grto_cli.core.tool_kinds import SAM2_HF_KIND, SAM2_KIND
from grto_cli.stages.console import console, progress_bar, summary_table
from grto_cli.stages.params import Params
from grto_cli.stages.record import write_run_record
from grto_cli.stages.runtime import cpu_threads, set_threads
from grto_cli.stages.sections import PolicyParams
from grto_cli.stages.live import StepLogger


@dataclass
class PretrainConfig:
    data: str = "data/prepared/synthetic"
    out: str = "models/base"
    live: str = "results/pretrain"
    seed: int = 0
    vlm: TinyVLMArch = field(default_factory=TinyVLMArch)
    sft: PolicySftConfig = field(default_factory=PolicySftConfig)
    sam: SamTrainConfig = field(default_factory=SamTrainConfig)
    # The tiny tool's kind: sam (segment-anything's Sam, the shipped base's), sam2-hf (a tiny
    # transformers Sam2Model) or sam2 (a tiny SAM2Base from Meta's sam2 package, ``grto[sam2]``),
    # trained the same way (``pretrain.sam``).
    tool_kind: str = SAM_KIND
    # The tool's warm-up in a second process beside the policy's, each on half the CPU threads
    # (with at least 2): on 2 cores neither gains much from a second thread, so side by side the
    # stage takes about as long as the policy's warm-up alone.
    parallel: bool = True
    # Copy the base shipped with grto (core/shipped.py) when it was built from this very config and
    # training data, instead of training it again; anything else trains from scratch.
    shipped: bool = True

    def validate(self) -> None:
        check_choice("sam.loss", self.sam.loss, SEG_LOSSES)
        check_choice("vlm.family", self.vlm.family, tuple(TINY_FAMILIES))
        check_choice("tool_kind", self.tool_kind, TINY_TOOL_KINDS)


SAM_BAR = "tiny SAM on ground-truth prompts"
TINY_TOOL_KINDS = (SAM_KIND, SAM2_HF_KIND, SAM2_KIND)


def _tiny_tool(cfg: PretrainConfig) -> Tool:
    """The untrained tiny tool of ``cfg.tool_kind``, its initial weights from the seed."""
    if cfg.tool_kind == SAM2_KIND:
        from grto_cli.core.sam2_meta import Sam2Tool

        return Sam2Tool(*tiny_sam2(-(-cfg.vlm.image_size // 64) * 64, seed=cfg.seed))
    if cfg.tool_kind == SAM2_HF_KIND:
        from grto_cli.core.sam2_hf import Sam2HfTool

        model, processor = tiny_sam2_hf(-(-cfg.vlm.image_size // 64) * 64, seed=cfg.seed)
        return Sam2HfTool(model, processor)
    arch = tiny_sam_arch(cfg.vlm.image_size)
    torch.manual_seed(cfg.seed)  # SAM's initial weights come from the global RNG
    return SamTool(build_sam(arch), arch)


def _train_tool(cfg: PretrainConfig, records: list[Record], root: Path, system: Path, on_step) -> dict:
    """Build the tiny tool (its initial weights from the seed), train it, write it into ``system``."""
    tool = _tiny_tool(cfg)
    with StepLogger(Path(cfg.live) / "sam") as log:
        stats = train_sam(tool, records, root, cfg.sam, cfg.seed,
                          on_step=lambda s, m: (log.log(s, m), on_step(s, m)))
    save_tool(tool, system)
    return {**stats, "tool_parameters": sum(p.numel() for p in tool.module.parameters())}


def _tool_process(cfg: PretrainConfig, manifest: str, system: str, threads: int, messages) -> None:
    """The tool's warm-up in a process of its own: ("step", k, stats) per step, then ("done",
    stats) or ("error", traceback) on ``messages``."""
    torch.set_num_threads(threads)
    try:
        records, _ = read_manifest(manifest)  # read here: a spawned process shares nothing with the main one
        stats = _train_tool(cfg, records, Path(manifest).parent, Path(system),
                            lambda s, m: messages.put(("step", s + 1, m)))
        messages.put(("done", stats))
    except BaseException:  # noqa: BLE001 - reported to the main process, which raises
        messages.put(("error", traceback.format_exc()))


class _ToolWarmup:
    """The main process's view of the tool's warm-up running beside it."""

    def __init__(self, cfg: PretrainConfig, manifest: Path, system: Path, threads: int):
        ctx = multiprocessing.get_context("spawn")
        self.messages = ctx.Queue()
        self.process = ctx.Process(target=_tool_process, args=(cfg, str(manifest), str(system), threads,
                                                               self.messages), daemon=True)
        self.process.start()
        self.step, self.total, self.stats, self.last = 0, cfg.sam.steps, None, {}

    def poll(self, timeout: float | None = None) -> None:
        """Read what the process said; ``timeout``: wait that long for the first message."""
        while True:
            try:
                message = self.messages.get(timeout=timeout) if timeout else self.messages.get_nowait()
            except queue_module.Empty:
                if timeout and not self.process.is_alive() and self.stats is None:
                    raise RuntimeError(f"pretrain: the tool's warm-up process ended (exit code "
                                       f"{self.process.exitcode}) without finishing") from None
                return
            timeout = None
            if message[0] == "step":
                self.step, self.last = message[1], message[2]
            elif message[0] == "done":
                self.stats, self.step = message[1], self.total
            else:
                raise RuntimeError(f"pretrain: the tool's warm-up failed:\n{message[1]}")

    def wait(self) -> dict:
        with progress_bar(SAM_BAR, self.total) as advance:
            while self.stats is None:
                self.poll(timeout=1.0)
                advance(completed=self.step, info=f"loss {self.last[TOOL_LOSS]:.3f}" if self.last else "")
        self.process.join()
        return self.stats

    def close(self) -> None:
        if self.process.is_alive():
            self.process.terminate()
        self.process.join()


def _use_shipped(cfg: PretrainConfig, pol_cfg: PolicyParams, manifest: Path) -> dict | None:
    """Copy the shipped base (and its warm-up curves) to ``cfg.out`` / ``cfg.live`` when it is what
    this config would train; its record's results, or None (and why not, printed) when it is not."""
    record = shipped_record()
    why = mismatches(record, asdict(cfg), asdict(pol_cfg), manifest)
    if cfg.tool_kind != SAM_KIND:
        why.append(f"pretrain.tool_kind: the shipped base's tool is {SAM_KIND}, asked {cfg.tool_kind}")
    if why:
        console.print("[yellow]pretrain: training from scratch; the base shipped with grto was built from "
                      "another config or data:[/yellow]\n  " + "\n  ".join(why))
        return None
    with atomic_dir(cfg.out) as tmp:
        copy_system(SHIPPED_BASE, tmp)
        shutil.copy2(SHIPPED_BASE / "run.json", tmp / "run.json")
    with atomic_dir(cfg.live) as tmp:
        shutil.copytree(SHIPPED_BASE / "live", tmp, dirs_exist_ok=True)
    results = dict(record.get("results", {}))
    summary_table("pretrain (shipped base)", {"out": cfg.out, **results})
    console.print(f"the base shipped with grto ({SHIPPED_BASE}) is what this config trains: copied to {cfg.out} "
                  f"(`--set pretrain.shipped=false` trains it again)")
    return results


def run(params: str | None, overrides: list[str] | None = None, **explicit) -> dict:
    read = Params(params, overrides)  # read once
    cfg, pol_cfg = read.section(PretrainConfig, "pretrain", **explicit), read.section(PolicyParams, "policy")
    set_threads()
    manifest = Path(cfg.data) / "train.jsonl"
    if cfg.shipped and (results := _use_shipped(cfg, pol_cfg, manifest)) is not None:
        return results
    records, _ = read_manifest(manifest)
    root = manifest.parent
    threads = cpu_threads()
    tool_warmup = None
    with atomic_dir(cfg.out) as tmp:
        try:
            if cfg.parallel and threads >= 2:
                tool_warmup = _ToolWarmup(cfg, manifest, tmp, threads // 2)
                torch.set_num_threads(threads - threads // 2)
            else:
                with progress_bar(SAM_BAR, cfg.sam.steps) as advance:
                    tool_stats = _train_tool(cfg, records, root, tmp,
                                             lambda s, m: advance(1, f"loss {m[TOOL_LOSS]:.3f}"))

            # The untrained policy goes through save_pretrained/from_pretrained before training, so
            # the warm-up trains exactly what a real checkpoint load would give.
            model, processor = build_tiny_vlm(cfg.vlm, seed=cfg.seed)
            save_policy(Policy(model, processor, pol_cfg.coord_convention or "absolute", pol_cfg.prompt_template),
                        tmp)
            policy = load_policy(tmp / POLICY_DIR, prompt_template=pol_cfg.prompt_template,
                                 coord_convention=pol_cfg.coord_convention)

            def sft_step(step: int, m: dict) -> None:
                log.log(step, m)
                info = f"loss {m[SFT_LOSS]:.3f}"
                if tool_warmup is not None:
                    tool_warmup.poll()
                    info += f", SAM beside it {tool_warmup.step}/{tool_warmup.total}"
                advance(1, info)

            with progress_bar("tiny VLM supervised warm-up", cfg.sft.steps) as advance, \
                    StepLogger(Path(cfg.live) / "policy") as log:
                sft_stats = train_policy_sft(policy, records, root, cfg.sft, cfg.seed, on_step=sft_step)
            save_policy(policy, tmp)
            if tool_warmup is not None:
                tool_stats = tool_warmup.wait()
        finally:
            if tool_warmup is not None:
                tool_warmup.close()
        results = {**tool_stats, **sft_stats,
                   "policy_parameters": sum(p.numel() for p in policy.model.parameters())}
        write_run_record(tmp / "run.json", "pretrain", {"pretrain": asdict(cfg), "policy": asdict(pol_cfg)},
                         {"train_manifest": manifest}, results)
    summary_table("pretrain", {"out": cfg.out, **{k: v for k, v in results.items()}})
    console.print(f"base system written to {cfg.out}")
    return results
