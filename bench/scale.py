"""Seconds per optimizer step and peak memory of SFT and SOAR on SD3.5-Medium's and FLUX.1-dev's transformers.

The transformers are built from their published configs with random weights (nothing is downloaded) and fed
random latents and text embeddings of the real shapes (512 px -> 16x64x64 latents; 1024 px -> 16x128x128; SD3
text 77 + 256 tokens of width 4096 and pooled 2048; FLUX 512 T5 tokens, pooled 768, embedded guidance). Only the
timing and memory mean anything; the loss values do not.

For each architecture, resolution and fine-tuning mode (LoRA r 32 through peft, or full), every combination of
gradient checkpointing, method (SFT, SOAR K in --ks with guided rollout) and aux chunk size runs ``--steps``
timed optimizer steps after one warm-up step. On CUDA, peak memory is ``torch.cuda.max_memory_allocated``; an
out-of-memory configuration is recorded as "OOM" and the run goes on. On a CPU, peak memory is the peak RSS
growth of a fresh subprocess per configuration (``--isolate``), or not measured. ``--max-seconds`` skips what
does not fit the budget (recorded as "skipped"); configurations run in priority order: SD3.5-M 512 px first,
then FLUX LoRA, then the rest.

    python bench/scale.py --out docs/perf/scale_gpu.json                 # GPU, full size
    python bench/scale.py --device cpu --scale 0.05 --resolutions 128 --text-len 16 --ks 1,4
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass

import torch

from soarflow import SOARConfig, sft_loss, soar_loss
from soarflow.objective import layout_name, resolve_layout

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # bench/official_loop.py beside this file
from official_loop import official_step  # noqa: E402
from scale_report import markdown, ratios  # noqa: E402

# Published transformer configs (diffusers config.json of stabilityai/stable-diffusion-3.5-medium and
# black-forest-labs/FLUX.1-dev), written out so that nothing is downloaded.
SD35M = dict(
    num_layers=24,
    num_attention_heads=24,
    attention_head_dim=64,
    joint_attention_dim=4096,
    caption_projection_dim=1536,
    pooled_projection_dim=2048,
    in_channels=16,
    out_channels=16,
    patch_size=2,
    sample_size=128,
    pos_embed_max_size=384,
    qk_norm="rms_norm",
    dual_attention_layers=tuple(range(13)),
)
FLUX1DEV = dict(
    num_layers=19,
    num_single_layers=38,
    num_attention_heads=24,
    attention_head_dim=128,
    joint_attention_dim=4096,
    pooled_projection_dim=768,
    in_channels=64,
    patch_size=1,
    guidance_embeds=True,
    axes_dims_rope=(16, 56, 56),
)
TEXT_LEN = {"sd3m": 77 + 256, "flux": 512}
LATENT_CHANNELS = 16  # both VAEs; FLUX packs 2x2 patches into 64 channels


LAYOUTS = {"auto": "auto", "reuse": True, "fused": False}  # --layouts -> soar.reuse_main_output


@dataclass
class Case:
    arch: str  # sd3m | flux
    resolution: int  # pixels; latents are resolution / 8
    finetune: str  # lora | full
    grad_ckpt: bool
    method: str  # sft | soar
    k: int  # aux points (0 for sft)
    aux_chunk: int | None
    optimizer: str  # adamw | adamw8bit
    batch: int = 1  # images per micro-batch (per GPU)
    quant: str | None = None  # LoRA on a quantized frozen base: "backend:weights" (model.quantize_base)
    layout: str = "auto"  # SOAR's forward layout: auto (by device type), reuse or fused (soar.reuse_main_output)

    @property
    def name(self) -> str:
        m = {"sft": "SFT", "soar": f"SOAR K={self.k}", "official": f"official K={self.k}"}[self.method]
        if self.method == "soar" and self.layout != "auto":
            m += f" ({self.layout})"
        q = f" q={self.quant}" if self.quant else ""
        ckpt = "on" if self.grad_ckpt else "off"
        return (
            f"{self.arch} {self.resolution}px b{self.batch} {self.finetune}{q} gc={ckpt} "
            f"{m} chunk={self.aux_chunk or '-'} {self.optimizer}"
        )


def scaled(config: dict, scale: float, arch: str) -> dict:
    """Depth and width (heads; head size kept, so RoPE axes stay valid) times ``scale``, at least 1."""
    if scale >= 1:
        return dict(config)
    c = dict(config)
    c["num_layers"] = max(1, round(config["num_layers"] * scale))
    c["num_attention_heads"] = max(1, round(config["num_attention_heads"] * scale))
    c["joint_attention_dim"] = max(16, round(config["joint_attention_dim"] * scale))
    c["pooled_projection_dim"] = max(16, round(config["pooled_projection_dim"] * scale))
    if arch == "sd3m":
        c["caption_projection_dim"] = c["num_attention_heads"] * c["attention_head_dim"]
        c["dual_attention_layers"] = tuple(range(min(c["num_layers"], max(1, round(13 * scale)))))
    else:
        c["num_single_layers"] = max(1, round(config["num_single_layers"] * scale))
    return c


def _classes(arch: str):
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from soarflow.tasks.flux import FluxVelocity
    from soarflow.tasks.sd3 import SD3Velocity

    return (
        (SD3Transformer2DModel, SD3Velocity, SD35M)
        if arch == "sd3m"
        else (FluxTransformer2DModel, FluxVelocity, FLUX1DEV)
    )


def _construct(cls, cfg: dict, device, dtype: torch.dtype):
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            return cls(**{k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()})
    finally:
        torch.set_default_dtype(old)


def count_parameters(arch: str, scale: float) -> int:
    """Parameters of the transformer, counted on the meta device (nothing allocated)."""
    cls, _, cfg = _classes(arch)
    return sum(p.numel() for p in _construct(cls, scaled(cfg, scale, arch), "meta", torch.float32).parameters())


def state_gib(params: int, finetune: str, optimizer: str) -> float:
    """Weights + gradients + optimizer state of a full fine-tune (fp32 master weights and gradients, AdamW's two
    moments in fp32, or one byte each for 8-bit Adam); for LoRA the bf16 frozen base alone (a lower bound)."""
    if finetune == "lora":
        return params * 2 / 2**30
    return params * (4 + 4 + (2 if optimizer == "adamw8bit" else 8)) / 2**30


def quantized_transformer(cls, cfg: dict, quant: str, device: torch.device, workdir: str):
    """The random-weight transformer loaded back through soarflow's ``model.quantize_base`` (a diffusers
    quantization config), as the trainer loads a quantized base: saved in bf16 to ``workdir``, then
    ``from_pretrained(..., quantization_config=...)``. Raises ``LookupError`` when this checkout has no
    ``model.quantize_base`` (soarflow.models.quantize) or the backend cannot run here (its package is missing)."""
    try:
        from soarflow.models.quantize import QuantizeSection, quantization_config
    except ImportError as err:
        raise LookupError(f"model.quantize_base is unknown in this checkout ({err})") from None
    backend, _, weights = quant.partition(":")
    try:  # before anything is saved: a backend whose package is missing (or that needs CUDA) skips every case
        qconfig = quantization_config(QuantizeSection(backend=backend, weights=weights or "int8"), torch.bfloat16)
    except ValueError as err:
        raise LookupError(str(err)) from None
    folder = os.path.join(workdir, f"{cls.__name__}_{abs(hash(json.dumps(cfg, default=str)))}")
    if not os.path.isdir(folder):
        _construct(cls, cfg, device, torch.bfloat16).save_pretrained(folder)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    model = cls.from_pretrained(folder, quantization_config=qconfig, torch_dtype=torch.bfloat16)
    return model.to(device) if backend != "bitsandbytes" else model  # bitsandbytes loads onto the GPU itself


def build(
    arch: str,
    scale: float,
    finetune: str,
    device: torch.device,
    lora_rank: int,
    quant: str | None = None,
    workdir: str | None = None,
):
    """The velocity model (soarflow's SD3/FLUX wrappers), built directly on ``device``."""
    from soarflow.models.lora import LoraSection, add_lora

    cls, wrap, cfg = _classes(arch)
    cfg = scaled(cfg, scale, arch)
    # LoRA: frozen base in bf16, adapters in fp32 (the trainer's layout); full: fp32 master weights, bf16 autocast.
    base_dtype = torch.bfloat16 if finetune == "lora" else torch.float32
    if quant:
        if finetune != "lora":
            raise ValueError("a quantized base trains LoRA only")
        transformer = quantized_transformer(cls, cfg, quant, device, workdir or "/tmp/soarflow_scale_models")
    else:
        transformer = _construct(cls, cfg, device, base_dtype)
    if finetune == "lora":
        add_lora(transformer, LoraSection(rank=lora_rank))
        for p in transformer.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    else:
        transformer.requires_grad_(True)
    transformer.train()
    return wrap(transformer), cfg


def batch_for(arch: str, cfg: dict, resolution: int, batch: int, text_len: int, device: torch.device):
    g = torch.Generator().manual_seed(0)
    side = resolution // 8
    x0 = torch.randn(batch, LATENT_CHANNELS, side, side, generator=g).to(device)
    emb = torch.randn(batch, text_len, cfg["joint_attention_dim"], generator=g).to(device)
    pooled = torch.randn(batch, cfg["pooled_projection_dim"], generator=g).to(device)
    cond = {"encoder_hidden_states": emb, "pooled_projections": pooled}
    null = {"encoder_hidden_states": torch.zeros_like(emb[:1]), "pooled_projections": torch.zeros_like(pooled[:1])}
    if arch == "flux":
        cond["guidance"] = torch.full((batch,), 3.5, device=device)
        null["guidance"] = torch.full((1,), 3.5, device=device)
    return x0, cond, null


def make_optimizer(name: str, params):
    if name == "adamw8bit":
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, lr=1e-5)
    return torch.optim.AdamW(params, lr=1e-5)


def run_case(case: Case, model, cfg: dict, args, device: torch.device) -> dict:
    """Time ``args.steps`` optimizer steps after a warm-up; peak memory on CUDA."""
    tr = model.transformer
    if case.grad_ckpt:
        tr.enable_gradient_checkpointing()
    elif getattr(tr, "gradient_checkpointing", False):
        tr.disable_gradient_checkpointing()
    text_len = args.text_len or TEXT_LEN[case.arch]
    x0, cond, null = batch_for(case.arch, cfg, case.resolution, case.batch, text_len, device)
    # FLUX-dev is guidance-distilled: its rollout uses the embedded guidance (guidance_scale 1), as the trainer does.
    w = 1.0 if case.arch == "flux" else 4.5
    objective = SOARConfig(
        num_aux=case.k, guidance_scale=w, aux_chunk_size=case.aux_chunk, reuse_main_output=LAYOUTS[case.layout]
    )
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(case.optimizer, params)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            if case.method == "official":  # the release's loop: its backward passes run inside
                official_step(
                    model,
                    x0,
                    cond,
                    null,
                    num_aux=case.k,
                    guidance_scale=w,
                    rollout_steps=40,
                    shift=objective.shift,
                    generator=gen,
                )
            else:
                if case.method == "sft":
                    out = sft_loss(model, x0, cond, config=objective.replace(num_aux=0), generator=gen)
                else:
                    out = soar_loss(model, x0, cond, null_cond=null, config=objective, generator=gen)
                out.loss.backward()
        opt.step()

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rss0 = _reset_peak_rss() if args.isolate_child else 0.0
    step()
    sync()
    times: list[float] = []
    for _ in range(args.steps):  # at least one timed step; then stop once --case-seconds is spent
        t0 = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - t0)
        if sum(times) >= args.case_seconds:
            break
    row = {"s_per_step": min(times), "s_per_step_all": times}
    if case.method == "soar":
        row["resolved_layout"] = layout_name(resolve_layout(objective, device))
    if device.type == "cuda":
        row["peak_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    elif args.isolate_child:
        row["peak_rss_growth_mib"] = (_peak_rss_kib() - rss0) / 1024
    opt = None  # free the optimizer state before the next case (the closures above are done with it)
    return row


def _status_kib(field: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return float(line.split()[1])
    except OSError:
        pass
    return None


def _reset_peak_rss() -> float:
    """Reset the peak-RSS mark (Linux: ``5`` into /proc/self/clear_refs) and return the current RSS in KiB, so
    that the peak growth measured after a step excludes the model build and imports."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)  # no reset: growth is a lower bound
    return _status_kib("VmRSS") or 0.0


def _peak_rss_kib() -> float:
    return _status_kib("VmHWM") or float(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def cases(args) -> list[Case]:
    """Every configuration, in priority order (SD3.5-M 512 px, FLUX LoRA, then larger/full)."""
    out = []
    if args.optimizers == "auto":
        opts = ["adamw"] + (["adamw8bit"] if _has_bitsandbytes() and args.device == "cuda" else [])
    else:
        opts = [o for o in args.optimizers.split(",") if o]
    batches = [int(b) for b in (args.batches or str(args.batch)).split(",")]
    quants = [None] + [q for q in args.quantize_base.split(",") if q]
    layouts = [v for v in args.layouts.split(",") if v and v != "auto"]  # auto is the plain SOAR row
    for v in layouts:
        if v not in LAYOUTS:
            raise SystemExit(f"--layouts: unknown layout {v!r} (choose from {', '.join(LAYOUTS)})")
    for arch in args.archs.split(","):
        for res in [int(r) for r in args.resolutions.split(",")]:
            for batch in batches:
                for ft in args.finetune.split(","):
                    for quant in quants if ft == "lora" else [None]:
                        for ckpt in [bool(int(v)) for v in args.grad_ckpt.split(",")]:
                            for opt in opts:

                                def add(method, k, chunk):
                                    out.append(Case(arch, res, ft, ckpt, method, k, chunk, opt, batch, quant))

                                add("sft", 0, None)
                                for k in [int(v) for v in args.ks.split(",")]:
                                    for chunk in _chunks(args.aux_chunks):
                                        add("soar", k, chunk)
                                    for layout in layouts:
                                        out.append(
                                            Case(arch, res, ft, ckpt, "soar", k, None, opt, batch, quant, layout)
                                        )
                                    if args.official:
                                        add("official", k, None)

    def priority(c: Case) -> tuple:
        res_rank = sorted({int(r) for r in args.resolutions.split(",")}).index(c.resolution)
        group = (
            0
            if (c.arch == "sd3m" and res_rank == 0)
            else 1
            if (c.arch == "flux" and c.finetune == "lora" and res_rank == 0)
            else 2
        )
        return (
            group,
            res_rank,
            c.arch != "sd3m",
            c.finetune != "lora",
            c.quant is not None,
            c.optimizer != "adamw",
            batches.index(c.batch),
        )

    return sorted(out, key=priority)  # stable: a group's SFT, SOAR and official rows stay together


def _chunks(text: str) -> list[int | None]:
    return [None if v in ("none", "-", "") else int(v) for v in text.split(",")]


def _has_bitsandbytes() -> bool:
    try:
        import bitsandbytes  # noqa: F401
    except Exception:
        return False
    return True


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.cuda.OutOfMemoryError) or "out of memory" in str(err).lower()


def report(paths: list[str], out: str | None, md: str | None) -> dict:
    """Merge the JSON files of several runs (e.g. bench/gpu_all.sh's parts) into one JSON and markdown table."""
    meta, rows = {}, []
    for path in paths:
        if not os.path.isfile(path):
            print(f"report: {path} missing (its part did not run); left out")
            continue
        with open(path) as fh:
            data = json.load(fh)
        meta = meta or data.get("meta", {})
        rows += data.get("rows", [])
    merged = {"meta": meta, "rows": rows, "ratios": ratios(rows)}
    if out:
        with open(out, "w") as fh:
            json.dump(merged, fh, indent=1)
    text = markdown(meta, rows)
    if md:
        with open(md, "w") as fh:
            fh.write(text)
    print(text)
    return merged


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--scale", type=float, default=None, help="fraction of depth/width (default: 1 on CUDA, 0.05 CPU)")
    ap.add_argument("--archs", default="sd3m,flux")
    ap.add_argument("--resolutions", default="512,1024", help="pixels (latents are /8)")
    ap.add_argument("--finetune", default="lora,full")
    ap.add_argument("--grad-ckpt", default="1,0", help="gradient checkpointing settings to run (1 on, 0 off)")
    ap.add_argument("--ks", default="1,2,4,6")
    ap.add_argument("--aux-chunks", default="none", help="aux_chunk_size values, e.g. none,2")
    ap.add_argument("--batch", type=int, default=1, help="micro-batch (images), when --batches is not given")
    ap.add_argument("--batches", default=None, help="micro-batches per GPU to run, e.g. 1,4")
    ap.add_argument(
        "--official",
        action="store_true",
        help="also time the official release's loop (bench/official_loop.py) at each K, as the anchor",
    )
    ap.add_argument(
        "--optimizers",
        default="auto",
        help="adamw,adamw8bit (bitsandbytes); auto: adamw, plus adamw8bit on CUDA when installed",
    )
    ap.add_argument(
        "--quantize-base",
        default="",
        help="LoRA on a quantized base too, as backend:weights (model.quantize_base), e.g. "
        "bitsandbytes:nf4,quanto:int8; skipped with a message where this checkout lacks the key",
    )
    ap.add_argument(
        "--layouts",
        default="auto",
        help="SOAR forward layouts to time: auto (the default, by device type), reuse, fused",
    )
    ap.add_argument("--text-len", type=int, default=None, help="text tokens (default: SD3 333, FLUX 512)")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=2, help="timed steps per configuration (at most)")
    ap.add_argument(
        "--case-seconds",
        type=float,
        default=float("inf"),
        help="stop timing a configuration after this many seconds of timed steps (at least one step)",
    )
    ap.add_argument("--max-seconds", type=float, default=float("inf"), help="skip configurations after this")
    ap.add_argument(
        "--memory-gib",
        type=float,
        default=None,
        help="skip full fine-tunes whose weights+gradients+optimizer state exceed this (default on "
        "CUDA: the device's memory)",
    )
    ap.add_argument("--workdir", default="/tmp/soarflow_scale_models", help="where a quantized base is saved")
    ap.add_argument("--isolate", action="store_true", help="CPU: each configuration in a fresh subprocess (RSS)")
    ap.add_argument("--isolate-child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help="write JSON here (rewritten after every configuration)")
    ap.add_argument("--markdown", default=None, help="write the ratio table (markdown) here at the end")
    ap.add_argument(
        "--report-from", default=None, help="no run: merge these comma-separated JSON files into --out and --markdown"
    )
    args = ap.parse_args()
    if args.report_from:
        report([p for p in args.report_from.split(",") if p], args.out, args.markdown)
        return
    device = torch.device(args.device)
    if args.scale is None:
        args.scale = 1.0 if device.type == "cuda" else 0.05
    if device.type == "cpu":
        torch.manual_seed(0)
    if args.memory_gib is None and device.type == "cuda":
        args.memory_gib = torch.cuda.get_device_properties(device).total_memory / 2**30

    if args.isolate_child:  # one configuration, result as JSON on stdout
        case = Case(**json.loads(args.isolate_child))
        model, cfg = build(case.arch, args.scale, case.finetune, device, args.lora_rank, case.quant, args.workdir)
        print("RESULT " + json.dumps(run_case(case, model, cfg, args, device)))
        return

    start = time.perf_counter()
    meta = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "scale": args.scale,
        "batch": args.batch,
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "threads": torch.get_num_threads(),
        "bitsandbytes": _has_bitsandbytes(),
        "argv": sys.argv[1:],
        "default_layout": layout_name(resolve_layout(SOARConfig(), device)),
    }
    rows: list[dict] = []
    models: dict[tuple, tuple] = {}
    params: dict[str, int] = {}
    no_quant: str | None = None  # why a quantized base cannot be built here (once known)

    def write():
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump({"meta": meta, "rows": rows, "ratios": ratios(rows)}, f, indent=1)

    print(f"device={device} ({meta['device_name']}) scale={args.scale} default layout={meta['default_layout']}")
    print(f"{'configuration':<78} {'s/step':>8} {'peak':>10}")
    for case in cases(args):
        row = {"case": case.name, **asdict(case)}
        if case.arch not in params:
            params[case.arch] = count_parameters(case.arch, args.scale)
        need = state_gib(params[case.arch], case.finetune, case.optimizer)
        if time.perf_counter() - start > args.max_seconds:
            row["status"] = "skipped"
        elif case.finetune == "full" and args.memory_gib and need > args.memory_gib:
            row["status"] = (
                f"skipped: weights, gradients and optimizer state alone need {need:.0f} GiB > {args.memory_gib:.0f} GiB"
            )
        elif case.quant and no_quant:
            row["status"] = f"skipped: {no_quant}"
        if "status" in row:
            rows.append(row)
            print(f"{case.name:<78} {row['status'][:60]}", flush=True)
            continue
        key = (case.arch, case.finetune, case.quant)
        try:
            if args.isolate and device.type == "cpu":
                cmd = [
                    sys.executable,
                    __file__,
                    "--device",
                    "cpu",
                    "--scale",
                    str(args.scale),
                    "--steps",
                    str(args.steps),
                    "--lora-rank",
                    str(args.lora_rank),
                    "--workdir",
                    args.workdir,
                    "--case-seconds",
                    str(args.case_seconds),
                    "--isolate-child",
                    json.dumps(asdict(case)),
                ]
                if args.text_len:
                    cmd += ["--text-len", str(args.text_len)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                result = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
                if proc.returncode or not result:
                    raise RuntimeError(proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else "no result")
                row.update(json.loads(result[0][7:]))
            else:
                if key not in models:
                    models.clear()  # one model at a time: free the previous one first
                    if device.type == "cuda":
                        torch.cuda.empty_cache()
                    models[key] = build(
                        case.arch, args.scale, case.finetune, device, args.lora_rank, case.quant, args.workdir
                    )
                model, cfg = models[key]
                row.update(run_case(case, model, cfg, args, device))
            row["status"] = "ok"
        except LookupError as err:  # no model.quantize_base, or its backend cannot run here: skip every quantized case
            no_quant = str(err)
            row["status"] = f"skipped: {no_quant}"
        except Exception as err:  # noqa: BLE001 - one failed configuration must not end the run
            row["status"] = "OOM" if _is_oom(err) else f"error: {type(err).__name__}: {str(err)[:200]}"
            if _is_oom(err):
                models.clear()
        if row["status"] != "ok" and device.type == "cuda":
            gc.collect()  # the exception's frames are gone now; free their tensors before the next configuration
            torch.cuda.empty_cache()
        rows.append(row)
        peak = (
            f"{row['peak_gib']:.1f} GiB"
            if "peak_gib" in row
            else f"{row['peak_rss_growth_mib']:.0f} MiB"
            if "peak_rss_growth_mib" in row
            else "-"
        )
        shown = f"{row['s_per_step']:>8.3f}" if row["status"] == "ok" else f"{row['status'][:60]}"
        print(f"{case.name:<78} {shown} {peak:>10}", flush=True)
        write()
    skipped = sum(r["status"].startswith("skipped") for r in rows)
    meta["wall_s"] = time.perf_counter() - start
    write()
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(markdown(meta, rows))
    for r in ratios(rows):
        print(
            f"{r['arch']} {r['resolution']}px b{r['batch']} {r['finetune']}{' ' + r['quant'] if r['quant'] else ''} "
            f"{r['optimizer']} K={r['k']}: SOAR/SFT {r['soar_over_sft'] or float('nan'):.2f}, "
            f"soarflow/official {r['soarflow_over_official'] or float('nan'):.2f}"
        )
    print(f"{len(rows)} configurations, {skipped} skipped; {meta['wall_s']:.0f} s")


if __name__ == "__main__":
    main()
