"""A Hugging Face model for calibration, onloaded one block at a time.

Calibrated conversion needs each pair's inputs on the calibration tokens, from the model as converted so far.
Running the whole model for every pair holds all of it in memory and costs one forward per pair up to that pair
(quadratic in depth). Here, as llm-compressor's sequential pipeline does, the model is a skeleton on the meta
device: the embeddings run once to give the first block's inputs (its hidden states and every keyword argument
the model passes it: attention mask, rotary embeddings, position ids), then are freed; each block is read from the
checkpoint when its first pair is calibrated, run on the stored hidden states (stopped at the pair being
calibrated), and, once its pairs are converted, run whole to give the next block's inputs and freed. The hidden
states are kept at the real tokens only (calibration batches are padded to their longest sentence) and padded
again, with zeros, one batch at a time as the block runs: a real token's output never depends on what
a padded position holds, since attention masks it out and everything else is per token. While a block's pair
calibrates, neither the hidden states nor the rest of the block are needed (only the pair's captured inputs and
its own weights are): the hidden states wait in an unlinked scratch file and the block's other weights are freed
(`park`); both come back, the weights read again from the checkpoint, when the block runs next. Peak memory: one
block, the embeddings at the start, and the calibration tokens' hidden states or the pair's working set, whichever
is larger.

`find_blocks` says whether a model can be run this way (every calibrated pair inside one ModuleList of blocks);
where not, convert runs the whole model as before.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from fpewiden.errors import FpewidenError
from fpewiden.io.checkpoint import Checkpoint


class _Stop(Exception):
    """Raised by a capture hook: nothing after the captured module needs to run."""


@dataclass(frozen=True)
class Blocks:
    """Where the blocks are: the ModuleList's path in the model and its length."""

    path: str
    count: int

    def index(self, module_path: str) -> int | None:
        """The block a module lies in, or None outside the blocks."""
        prefix = f"{self.path}." if self.path else ""
        if not module_path.startswith(prefix):
            return None
        head = module_path[len(prefix) :].split(".", 1)[0]
        return int(head) if head.isdigit() and int(head) < self.count else None


def find_blocks(model: nn.Module, module_paths: list[str]) -> Blocks | None:
    """The outermost ModuleList whose items hold every one of `module_paths`, or None."""
    found: Blocks | None = None
    for path in module_paths:
        parts = path.split(".")
        here = None
        for i in range(len(parts) - 1):
            if not parts[i + 1].isdigit():
                continue
            parent = ".".join(parts[: i + 1])
            mod = model.get_submodule(parent)
            if isinstance(mod, nn.ModuleList):
                here = Blocks(parent, len(mod))
                break
        if here is None or (found is not None and here != found):
            return None
        found = here
    return found


def _free(mod: nn.Module, leaf: str) -> None:
    """Free one parameter (the skeleton keeps its shape)."""
    p = mod._parameters.get(leaf)
    if p is not None and p.device.type != "meta":
        mod._parameters[leaf] = nn.Parameter(p.to("meta"), requires_grad=False)


def _to_meta(module: nn.Module) -> None:
    """Free a module's parameters."""
    for mod in module.modules():
        for leaf in list(mod._parameters):
            _free(mod, leaf)


def _with_hidden(args: tuple, kwargs: dict, h: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (h, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": h}


def _hidden(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else kwargs["hidden_states"]


class OnloadedModel:
    """The model skeleton, the hidden states entering the current block for every calibration batch, and that
    block's weights (see the module docstring)."""

    def __init__(
        self,
        ck: Checkpoint,
        model: nn.Module,
        blocks: Blocks,
        batches: list[dict],
        key_of: dict[str, str],
        real: list[torch.Tensor],
        scratch: Path | None = None,
    ):
        self.ck, self.model, self.blocks, self.batches = ck, model, blocks, batches
        self.scratch = scratch  # where parked hidden states wait (None: the system's temporary directory)
        self._parked: _Parked | None = None
        self._freed: list[str] = []  # model keys of the block's weights that park freed
        self.key_of = key_of  # checkpoint tensor name -> the model's parameter or buffer key
        self.real = real  # per batch: batch × tokens, False at padding
        self.current = -1  # the block whose weights are loaded
        # per batch: what the current block receives, its hidden states at the real tokens only (`packed[i]`) or,
        # where the block's hidden states are not batch × tokens × width, whole
        self.states: list[tuple[tuple, dict]] = []
        self.packed: list[bool] = []
        self._capture_first()

    @classmethod
    def open(
        cls,
        ck: Checkpoint,
        model: nn.Module,
        batches: list[dict],
        pair_weights: list[str],
        real: list[torch.Tensor],
        scratch: Path | None = None,
    ) -> OnloadedModel | None:
        """The onloaded model from its skeleton (model/skeleton.py `empty_model`), or None where the calibrated
        pairs are not all inside one list of blocks. `real`: per batch, which tokens are not padding. `scratch`:
        the directory parked hidden states wait in."""
        from fpewiden.model.skeleton import checkpoint_key

        params = dict(model.named_parameters(remove_duplicate=False))
        params |= dict(model.named_buffers(remove_duplicate=False))
        key_of = {}
        for name in ck.shapes:
            key = checkpoint_key(model, name, params)
            if key is not None:
                key_of[name] = key
        paths = []
        for name in pair_weights:
            if name not in key_of:
                return None
            paths.append(key_of[name].rsplit(".", 1)[0])
        blocks = find_blocks(model, paths)
        return None if blocks is None else cls(ck, model, blocks, batches, key_of, real, scratch)

    def block(self, i: int) -> nn.Module:
        return self.model.get_submodule(f"{self.blocks.path}.{i}" if self.blocks.path else str(i))

    def _load(self, outside: bool, block: int | None = None, only: set[str] | None = None) -> None:
        """Read tensors from the checkpoint into the skeleton: those outside the blocks, or one block's (`only`:
        those of its model keys)."""
        from fpewiden.model.skeleton import assign

        for name, key in self.key_of.items():
            i = self.blocks.index(key)
            if (outside and i is None) or (not outside and i == block and (only is None or key in only)):
                t = self.ck.get(name)
                assign(self.model, key, t.to(torch.float32) if t.is_floating_point() else t)

    @torch.no_grad()
    def _capture_first(self) -> None:
        """Run the embeddings (everything before block 0) once per batch and keep what block 0 receives."""
        self._load(outside=True)
        first = self.block(0)

        def hook(_mod: nn.Module, args: tuple, kwargs: dict) -> None:
            self._keep(len(self.states), args, dict(kwargs))
            raise _Stop

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        extra = {"use_cache": False} if "use_cache" in _forward_args(self.model) else {}
        try:
            for batch in self.batches:
                try:
                    self.model(**batch, **extra)
                except _Stop:
                    pass
                else:
                    raise FpewidenError("calibration: the model's first block did not run on the calibration samples")
        finally:
            handle.remove()
        _to_meta(self.model)  # the embeddings are not needed again; block weights are read as they are reached

    def _keep(self, i: int, args: tuple, kwargs: dict) -> None:
        """Store batch i's block inputs, the hidden states at the real tokens only where they are batch × tokens
        and the model is told which tokens are padding (so that padded positions never reach a real token)."""
        h = _hidden(args, kwargs)
        masked = "attention_mask" in self.batches[i]
        packed = masked and h.dim() == 3 and tuple(h.shape[:2]) == tuple(self.real[i].shape)
        state = _with_hidden(args, kwargs, h[self.real[i]]) if packed else (args, kwargs)
        if i == len(self.states):
            self.states.append(state)
            self.packed.append(packed)
        else:
            self.states[i], self.packed[i] = state, packed

    def park(self) -> None:
        """While a pair calibrates (see the module docstring): move the hidden states to a scratch file and free
        the current block's weights, those `release` has not freed already; they come back, bit for bit, the next
        time the block runs. Hidden states are parked where they are carried at the real tokens (the usual case):
        other states stay in memory. Call it after the pair's inputs are captured and its weights released, not
        before: the converted pair's weights are put into the block later and must not be read over."""
        if self._parked is None and any(self.packed):
            self._parked = _Parked(self.scratch, self.states, self.packed)
        if self.current >= 0 and not self._freed:
            prefix = f"{self.blocks.path}.{self.current}." if self.blocks.path else f"{self.current}."
            stored = set(self.key_of.values())
            for name, p in self.block(self.current).named_parameters():
                if p.device.type != "meta" and prefix + name in stored:
                    self._freed.append(prefix + name)
            for key in self._freed:
                path, leaf = key.rsplit(".", 1)
                _free(self.model.get_submodule(path), leaf)

    def _unpark(self) -> None:
        if self._parked is not None:
            self._parked.restore(self.states)
            self._parked = None
        if self._freed:  # not those the converted pair has been given since (a refitted bias)
            gone = {k for k in self._freed if self.model.get_parameter(k).device.type == "meta"}
            self._load(outside=False, block=self.current, only=gone)
            self._freed = []

    def _padded(self, i: int) -> tuple[tuple, dict]:
        """Batch i's block inputs as the block takes them: the hidden states padded again (zeros at padding)."""
        self._unpark()
        args, kwargs = self.states[i]
        if not self.packed[i]:
            return args, kwargs
        rows = _hidden(args, kwargs)
        h = rows.new_zeros((*self.real[i].shape, rows.shape[-1]))
        h[self.real[i]] = rows
        return _with_hidden(args, kwargs, h)

    def _run(self, block: nn.Module, i: int) -> object:
        args, kwargs = self._padded(i)
        return block(*args, **kwargs)

    @torch.no_grad()
    def _advance(self) -> None:
        """Run the current block whole on every batch: its outputs are the next block's inputs."""
        block = self.block(self.current)
        for i in range(len(self.states)):  # in place: one batch's states exist twice, not all
            args, kwargs = self._padded(i)
            out = block(*args, **kwargs)
            h = out[0] if isinstance(out, tuple) else out
            self._keep(i, *_with_hidden(args, kwargs, h))
            del args, kwargs, out, h
        _to_meta(block)

    def seek(self, i: int) -> None:
        """Make block `i` the loaded one, running every block before it (the converted ones as converted)."""
        if i < self.current:
            raise AssertionError(f"pairs are calibrated in forward order (block {i} after {self.current})")
        while self.current < i:
            if self.current >= 0:
                self._advance()
            self.current += 1
            self._load(outside=False, block=self.current)

    def module(self, ck_name: str) -> tuple[str, nn.Module]:
        """The module holding a checkpoint tensor, and its path in the model; its block becomes the loaded one."""
        key = self.key_of.get(ck_name)
        if key is None:
            raise FpewidenError(f"calibration: the model built by transformers has no tensor {ck_name}")
        i = self.blocks.index(key)
        if i is None:
            raise AssertionError(f"{ck_name} is outside the model's blocks")
        self.seek(i)
        path = key.rsplit(".", 1)[0]
        return path, self.model.get_submodule(path)

    def inputs(self, ck_name: str, keep: list[torch.Tensor]) -> torch.Tensor:
        """What the module holding `ck_name` receives on every calibration batch, at the tokens `keep` marks
        (per batch: batch × tokens, False at padding)."""
        _, module = self.module(ck_name)
        block = self.block(self.current)
        runs = [lambda i=i: self._run(block, i) for i in range(len(self.states))]
        return capture_inputs(module, runs, keep, ck_name)

    def release(self, ck_name: str) -> None:
        """Free the weight of the module holding `ck_name`: once a pair's inputs are captured, its original
        weights are not run again (the converted pair replaces them before the block runs on), and the pair
        arrives from the checkpoint besides."""
        _, module = self.module(ck_name)
        _free(module, "weight")


class _Parked:
    """Hidden states written, batch after batch, to an unlinked temporary file (it disappears with the process,
    however that ends) and freed from memory; `restore` reads them back into the states."""

    def __init__(self, scratch: Path | None, states: list[tuple[tuple, dict]], packed: list[bool]):
        self.rows: dict[int, tuple[torch.Size, torch.dtype]] = {}
        try:
            self.file = tempfile.TemporaryFile(dir=scratch, prefix=".fpewiden-hidden-")
        except OSError as e:
            raise FpewidenError(f"calibration: cannot create a scratch file in {scratch}: {e.strerror}") from None
        try:
            for i, (args, kwargs) in enumerate(states):
                if packed[i]:
                    h = _hidden(args, kwargs).contiguous()
                    self.file.write(h.view(torch.uint8).numpy().data)
                    self.rows[i] = (h.shape, h.dtype)
        except OSError as e:
            self.file.close()
            raise FpewidenError(
                f"calibration: cannot write the hidden states to a scratch file in {scratch}: {e.strerror}"
            ) from None
        for i in self.rows:
            states[i] = _with_hidden(*states[i], torch.empty(0))

    def restore(self, states: list[tuple[tuple, dict]]) -> None:
        self.file.seek(0)
        for i, (shape, dtype) in self.rows.items():
            h = torch.empty(shape, dtype=dtype)
            raw = h.view(torch.uint8).numpy().reshape(-1)
            if self.file.readinto(raw) != raw.nbytes:
                raise FpewidenError("calibration: the scratch file of hidden states was cut short")
            states[i] = _with_hidden(*states[i], h)
        self.file.close()


@torch.no_grad()
def capture_inputs(
    module: nn.Module, runs: list[Callable[[], object]], keep: list[torch.Tensor], what: str
) -> torch.Tensor:
    """The first input `module` receives in each of `runs` (forwards stopped right there), at the tokens `keep[i]`
    marks for run i, concatenated in fp32 (written into one tensor as they come: never held twice)."""
    captured: list[torch.Tensor] = []

    def hook(_mod: nn.Module, args: tuple) -> None:
        captured.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    total = sum(int(k.sum()) for k in keep)
    out: torch.Tensor | None = None
    at = 0
    try:
        for i, run in enumerate(runs):
            captured.clear()
            try:
                run()
            except _Stop:
                pass
            if not captured:
                raise FpewidenError(f"calibration: {what} did not run on the calibration samples")
            rows = captured[0][keep[i]]
            captured.clear()
            if out is None:
                out = torch.empty(total, *rows.shape[1:], dtype=torch.float32, device=rows.device)
            out[at : at + len(rows)] = rows
            at += len(rows)
            del rows
    finally:
        handle.remove()
    assert out is not None and at == total
    return out


def _forward_args(model: nn.Module) -> set[str]:
    import inspect

    return set(inspect.signature(model.forward).parameters)
