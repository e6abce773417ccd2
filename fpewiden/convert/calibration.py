"""Calibrated conversion: the transform that sees data.

Pairs are converted in forward order. Before pair k is converted, the calibration samples run through the model
as converted so far, and pair k's inputs are captured (for Hugging Face models by a hook on the pair's first
projection, the forward stopped right there; for MLP chains the previous pair's converted activations are the
inputs). The pair's own output on those inputs is the target (fpe/calibrated.py does the math). The converted
pair then replaces the original in the model, so the next pair sees its effect, as SparseGPT does.

Hugging Face models whose pairs lie in a list of blocks (every transformer here) are onloaded one block at a time
(convert/onload.py): the calibration tokens' hidden states are carried from block to block, so memory is one
block, those hidden states (in a scratch file beside the output while a pair calibrates), one pair's inputs, the
widened pair's activations and one Gram matrix at a time, and each block runs once per pair in it instead of the
whole prefix of the model. Others run whole, in memory.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from fpewiden.arch import PairSpec
from fpewiden.convert.onload import OnloadedModel, capture_inputs
from fpewiden.convert.options import ConvertOptions
from fpewiden.convert.transform import Converted, assignment, pair_seed
from fpewiden.devices import resolve_device
from fpewiden.errors import FpewidenError
from fpewiden.fpe.calibrated import CalibratedOptions, calibrate_pair
from fpewiden.fpe.expand import Pair
from fpewiden.fpe.pair_function import PairFunction
from fpewiden.fpe.quantized_pair import quantize_pair
from fpewiden.fpe.selection import activation_split
from fpewiden.io.checkpoint import Checkpoint

# Default calibration sets. On MiniLM 4,096 tokens overfitted the refits (3,072 features per row): at half the FFN
# non-zeros calibrated pruning kept cosine 0.978 / 0.940 (TREC / SST-5), with ~22k tokens 0.983 / 0.954, with
# ~60k 0.984 / 0.955 at 2.3× the time (bench/results/calibration).
MLP_SAMPLES = 8192
HF_TOKENS = 16384  # sentences until this many tokens
MIN_SAMPLES = 8
MAX_TOKENS = 128


def _activation_of(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    from fpewiden.model.chain_mlp import ACTIVATIONS

    return ACTIVATIONS[name]


class CalibratedTransform:
    """A PairTransform that converts each pair from its calibration inputs (see the module docstring)."""

    def __init__(
        self,
        ck: Checkpoint,
        opts: ConvertOptions,
        chosen: list[PairSpec],
        scratch: Path | None = None,
        last_use: dict[str, int] | None = None,
    ):
        """`scratch`: the directory where the carried hidden states wait while a pair calibrates (convert gives the
        output's; None: the system's temporary directory). `last_use`: the plan's index of the last pair that
        converts each matrix (--quantize quantizes a matrix there: in a chain a hidden matrix is one pair's
        outgoing and the next one's incoming, and quantized values would not survive the next pair's refit)."""
        assert opts.calibration is not None
        self.ck, self.opts, self.settings = ck, opts, opts.calibration
        c = opts.calibration
        self.copts = CalibratedOptions(
            alpha=opts.alpha,
            fraction=opts.expand_fraction,
            importance=c.importance,
            reconstruct=c.reconstruct,
            ridge=c.ridge,
            anchor=c.anchor,
            refit_incoming=c.refit_incoming,
            refit_outgoing=c.refit_outgoing,
            solver=c.solver,
            device=str(resolve_device(c.device)),
        )
        self.chosen, self.scratch = chosen, scratch
        self.last_use = last_use or {}
        self.stats: list[dict] = []
        self.warnings: list[str] = []  # printed by the CLI after the conversion
        if ck.kind == "mlp":
            self._init_mlp()
        else:
            self._init_hf()

    # ---- MLP chains: the transform carries the activations from pair to pair
    def _init_mlp(self) -> None:
        from fpewiden.arch.chain import linear_layers
        from fpewiden.data.specs import load_inputs

        x = load_inputs(self.settings.data, self.opts.seed)[: self.settings.samples or MLP_SAMPLES]
        if len(x) < MIN_SAMPLES:
            raise FpewidenError(f"--calibration {self.settings.data}: {len(x)} samples; at least {MIN_SAMPLES}")
        first = linear_layers(self.ck)[0]
        d = self.ck.shapes[first[1]][1]
        if x.shape[1] != d:
            raise FpewidenError(
                f"--calibration {self.settings.data} has {x.shape[1]} features but the model's first layer reads {d}"
            )
        self.fn = PairFunction(_activation_of(self.opts.activation))
        self.x0 = x.to(torch.float32)
        # the chain as converted so far: (module name, weight, bias) per Linear, float32
        self.layers = [
            [name, self.ck.get(w).float(), self.ck.get(b).float() if b else None]
            for name, w, b in linear_layers(self.ck)
        ]
        self.samples = len(x)
        alpha = self.opts.alpha if self.opts.expand_fraction > 0 else 1
        widest = max(self.ck.shapes[p.in_weights[0]][0] for p in self.chosen) * alpha  # the outgoing refit
        if self.samples < widest:
            self.warnings.append(
                f"calibrating on {self.samples} samples: fewer than the {widest} features of the widest refit, so "
                "the least-squares refits are decided by their ridge, not by the data; give more samples"
            )

    def _mlp_inputs(self, spec: PairSpec) -> tuple[int, torch.Tensor]:
        """The pair's inputs: the samples through every layer before it, as converted so far."""
        x = self.x0
        for i, (name, w, b) in enumerate(self.layers):
            if name == spec.name:
                return i, x
            x = self.fn.act(x @ w.T + (b if b is not None else 0))
        raise AssertionError(spec.name)

    # ---- Hugging Face models: the model runs in memory, pairs are swapped in as they are converted
    def _init_hf(self) -> None:
        from fpewiden.arch.hf import family_of
        from fpewiden.data.text import load_tokenizer, read_sentences
        from fpewiden.model.loaded import load_model
        from fpewiden.model.skeleton import empty_model

        path = Path(self.settings.data)
        sentences = read_sentences(path, MIN_SAMPLES, "calibration")
        self.family = family_of(self.ck.config or {})
        tok = load_tokenizer([self.ck.path])
        chosen, tokens = [], 0
        for s in sentences:
            if self.settings.samples is not None and len(chosen) >= self.settings.samples:
                break
            if self.settings.samples is None and tokens >= HF_TOKENS:
                break
            chosen.append(s)
            tokens += len(tok(s, truncation=True, max_length=MAX_TOKENS)["input_ids"])
        if len(chosen) < MIN_SAMPLES:
            raise FpewidenError(f"--calibration {path}: {len(chosen)} samples; at least {MIN_SAMPLES}")
        skeleton = empty_model(self.ck.path, head=False)
        keys = [k for k in ("input_ids", "attention_mask", "token_type_ids") if k in _forward_args(skeleton)]
        self.batches, self.real = [], []  # model inputs per batch; which of their tokens are not padding
        for i in range(0, len(chosen), 32):
            enc = tok(chosen[i : i + 32], padding=True, truncation=True, max_length=MAX_TOKENS, return_tensors="pt")
            self.batches.append({k: enc[k] for k in keys if k in enc})
            self.real.append(enc["attention_mask"].bool())
        self.samples, self.tokens = len(chosen), tokens
        if tokens < HF_TOKENS:
            self.warnings.append(
                f"calibrating on {tokens:,} tokens ({len(chosen)} samples): on MiniLM 4,096 tokens overfitted the "
                f"refits (bench/results/calibration); give at least {HF_TOKENS:,} tokens"
            )
        weights = [name for spec in self.chosen for name in (*spec.in_weights, spec.out_weight)]
        self.onloaded = (
            None
            if self.settings.whole_model
            else OnloadedModel.open(self.ck, skeleton, self.batches, weights, self.real, self.scratch)
        )
        if self.onloaded is not None:
            self.model = self.onloaded.model
            return
        self.loaded = load_model(self.ck.path)
        self.model = self.loaded.model.eval()
        self.names = {id(p): n for n, p in self.model.named_parameters()}

    def _module(self, ckpt_name: str) -> tuple[str, nn.Module]:
        """The module holding a checkpoint tensor, and its path in the model."""
        if self.onloaded is not None:
            return self.onloaded.module(ckpt_name)
        param = self.loaded.param_of.get(ckpt_name)
        if param is None:
            raise FpewidenError(f"calibration: the model loaded by transformers has no tensor {ckpt_name}")
        path = self.names[id(param)].rsplit(".", 1)[0]
        return path, self.model.get_submodule(path)

    def _hf_function(self, spec: PairSpec) -> PairFunction:
        path, _ = self._module(spec.in_weights[0])
        layer = path[: -len(self.family.ins[0])].rstrip(".")
        act = functools.reduce(getattr, self.family.act.split("."), self.model.get_submodule(layer))
        return PairFunction(act, self.family.gated)

    def _hf_inputs(self, spec: PairSpec) -> torch.Tensor:
        if self.onloaded is not None:
            x = self.onloaded.inputs(spec.in_weights[0], self.real)
            for name in (*spec.in_weights, spec.out_weight):  # converted from the pair as read, not these
                self.onloaded.release(name)
            self.onloaded.park()  # the hidden states and the rest of the block wait while the pair calibrates
            return x
        _, module = self._module(spec.in_weights[0])
        runs = [lambda b=b: self.model(**b) for b in self.batches]
        return capture_inputs(module, runs, self.real, f"layer {spec.name}")

    def _hf_update(self, spec: PairSpec, pair: Pair, b_out: torch.Tensor | None) -> None:
        """Put the converted pair into the in-memory model (weights in the module's own orientation)."""
        for name, bias_name, w, b in zip(spec.in_weights, spec.in_biases, pair.w_in, pair.b_in, strict=True):
            _, mod = self._module(name)
            _set(mod, w, b if bias_name else None, spec.transposed)
        _, mod = self._module(spec.out_weight)
        _set(mod, pair.w_out, b_out if spec.out_bias else None, spec.transposed)

    def summary(self) -> dict:
        """For the output's metadata: what calibration ran on and what it did per layer."""
        c = self.settings
        return {
            "data": c.data,
            "samples": self.samples,
            **({"tokens": self.tokens} if self.ck.kind == "hf" else {}),
            "importance": c.importance,
            "reconstruct": c.reconstruct,
            "select": c.select,
            "expand_fraction": self.copts.fraction,
            "ridge": c.ridge if c.ridge is not None else "chosen per refit on held-out tokens",
            "solver": c.solver,
            "device": self.copts.device,
            **({"quantization": self.opts.quantize.summary()} if self.opts.quantize else {}),
            "layers": self.stats,
        }

    # ---- the transform
    def _split(self, spec: PairSpec, x: torch.Tensor) -> Callable[[Pair, torch.Tensor, torch.Tensor], torch.Tensor]:
        def split(pair: Pair, support: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
            if self.opts.split == "activation":
                xc = x - x.mean(0)
                cov = (xc.T @ xc) / max(1, len(x) - 1)
                source = pair.w_in[0] if len(pair.w_in) == 1 else sum(w.float().abs() for w in pair.w_in)
                return activation_split(source.float(), support, cov, self.copts.alpha)
            gen = torch.Generator().manual_seed(pair_seed(self.opts.seed, spec.name))
            return assignment(self.opts, pair, support, gen)

        return split

    def __call__(
        self, k: int, spec: PairSpec, pair: Pair, budget: int | None, b_out: torch.Tensor | None = None
    ) -> Converted:
        dtypes = [w.dtype for w in pair.w_in] + [pair.w_out.dtype]
        in_dtypes = [None if b is None else b.dtype for b in pair.b_in]
        # the pair is the transform's from here (the pipeline reads only its masks after): its weights are
        # replaced by their fp32 form in place, so a bf16 checkpoint's pair is not held in both dtypes
        pair.w_in[:] = [w.float() for w in pair.w_in]
        pair.b_in[:] = [None if b is None else b.float() for b in pair.b_in]
        pair.w_out = pair.w_out.float()
        f32 = pair
        if self.ck.kind == "mlp":
            i, x = self._mlp_inputs(spec)
            fn = self.fn
        else:
            x, fn = self._hf_inputs(spec), self._hf_function(spec)
        res = calibrate_pair(
            f32, x, fn, None if b_out is None else b_out.float(), self.copts, self._split(spec, x), budget, release=True
        )
        out, scales = res.pair, None
        if self.opts.quantize is not None:
            q = self.opts.quantize
            which = [self.last_use.get(n, k) == k for n in (*spec.in_weights, spec.out_weight)]
            # an FPE pair whose every neuron is widened is stored in the parent layout: children share a scale
            unit = self.copts.alpha if self.copts.alpha > 1 and self.copts.fraction >= 1 else 1
            quantized = quantize_pair(out, x, fn, q.grid(), which, q.compensate, unit)
            out, scales = quantized.pair, quantized.scales
            quant_errors = quantized.errors
        if self.ck.kind == "mlp":
            self.layers[i][1:] = [out.w_in[0], out.b_in[0]]
            self.layers[i + 1][1] = out.w_out
            if res.b_out is not None:
                self.layers[i + 1][2] = res.b_out
        else:
            self._hf_update(spec, out, res.b_out)
        self.stats.append(
            {
                "layer": spec.name,
                "expanded": res.expanded,
                "output_error_before_refit": res.error_before,
                "output_error": res.error_after,
                "ridges": res.ridges,
                "solvers": res.solvers,
                **({"quantization_errors": quant_errors} if scales is not None else {}),
            }
        )
        blocks = [
            (i, 0, w.to(dt).contiguous(), m)
            for i, (w, m, dt) in enumerate(zip([*out.w_in, out.w_out], [*out.m_in, out.m_out], dtypes, strict=True))
        ]
        in_biases = [None if b is None else b.to(dt) for b, dt in zip(out.b_in, in_dtypes, strict=True)]
        return Converted(blocks, in_biases, res.b_out if b_out is not None else None, 0, scales)


def _forward_args(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)


def _set(mod: nn.Module, w: torch.Tensor, b: torch.Tensor | None, transposed: bool) -> None:
    """Replace a Linear's (or GPT-2 Conv1D's) weight and bias with tensors of a new width."""
    weight = (w.T if transposed else w).to(torch.float32).contiguous()
    mod.weight = nn.Parameter(weight, requires_grad=False)
    if b is not None:
        mod.bias = nn.Parameter(b.to(torch.float32).contiguous(), requires_grad=False)
    if hasattr(mod, "nf"):  # Conv1D computes its output shape from nf
        mod.nf = weight.shape[1]
