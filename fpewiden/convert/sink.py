"""Where converted tensors go: the output files, written while the conversion streams.

A block of rows is written at its offset the moment it exists when it is final and stored neuron-major. A
matrix a later pair still reads (an MLP chain's hidden-to-hidden matrix) is gathered and held in memory for that
pair; a transposed one (GPT-2's Conv1D) is gathered and written whole. Masks are bit-packed as their blocks pass.
At the end the sink writes the changed biases, copies every untouched tensor byte for byte, writes the masks and
the final metadata (results known only now), and closes. On failure every partial file is dropped.
"""

from __future__ import annotations

from pathlib import Path

import torch

from fpewiden.convert.plan import Plan
from fpewiden.fpe.expand import count
from fpewiden.io.checkpoint import MASK_PREFIX, SCALE_PREFIX, Checkpoint, pack_mask, packed_size
from fpewiden.io.safetensors_stream import StreamingWriter


def _neuron_major(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    return t.T if transposed else t


class OutputSink:
    def __init__(
        self,
        ck: Checkpoint,
        plan: Plan,
        paths: dict[str, Path],
        masks_path: Path | None,
        meta: dict,
        tied: dict[str, int] | None = None,
        scales: dict[str, tuple[int, int]] | None = None,
    ):
        """`paths`: output path per weight file of the checkpoint; masks go inside the single weights file when
        `masks_path` is None (MLP outputs), else into their own file (Hugging Face folders). `tied`: outgoing
        matrices stored as α equal copies per parent (counted once). `scales`: the quantization scales each
        quantized matrix will have (fp32, (output rows, groups)), stored where the masks are."""
        self.ck, self.plan = ck, plan
        self.tied = tied or {}
        self.mask_names = sorted(set(plan.matrices) | set(ck.packed_masks))
        by_file: dict[str, dict[str, tuple[str, tuple[int, ...]]]] = {}
        for name in ck.shapes:
            by_file.setdefault(ck.file_of[name], {})[name] = (ck.dtypes[name], plan.shapes[name])
        mask_layout = {f"{MASK_PREFIX}{n}": ("U8", (packed_size(plan.shapes[n]),)) for n in self.mask_names}
        self.scale_shapes = scales or {}
        mask_layout.update({f"{SCALE_PREFIX}{n}": ("F32", shape) for n, shape in self.scale_shapes.items()})
        self.scales: dict[str, torch.Tensor] = {}
        if masks_path is None:
            (only,) = by_file
            by_file[only].update(mask_layout)
            self.mask_file = only
        else:
            self.mask_file = "__masks__"
        reserve = 4096 + 512 * len(plan.chosen)  # header room for the results set_metadata records at the end
        self.writers: dict[str, StreamingWriter] = {}
        try:
            for f, layout in by_file.items():
                self.writers[f] = StreamingWriter(paths[f], layout, meta, reserve)
            if masks_path is not None:
                self.writers[self.mask_file] = StreamingWriter(masks_path, mask_layout, meta, reserve)
        except BaseException:
            self.abort()
            raise
        self.packed = dict(ck.packed_masks)
        self.nnz_written: dict[str, int] = {}
        self.biases: dict[str, torch.Tensor] = {}
        self._parts: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        self._held: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.nnz_held: dict[str, int] = {}

    def take(self, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        """A matrix an earlier pair converted and held for this one (weights, mask), in stored orientation."""
        return self._held.pop(name, None)

    def _finish(self, name: str, packed: torch.Tensor, nnz: int) -> None:
        self.packed[name] = packed
        self.nnz_written[name] = nnz // self.tied.get(name, 1)

    def emit(self, k: int, name: str, row: int, w: torch.Tensor, m: torch.Tensor, rows: int, transposed: bool) -> None:
        """Pair k produced rows [row, row + len) of the `rows` rows matrix `name` has in neuron-major form now.
        Pruned weights are written +0.0: a mask multiplying a negative weight leaves -0.0, which a packed file
        would have to record to give the tensor back bit for bit."""
        w = w.masked_fill(~m.bool(), 0.0)
        done = row + w.shape[0] == rows
        final = self.plan.last_use[name] <= k
        if final and not transposed:
            self.writers[self.ck.file_of[name]].write(name, w, row_start=row)
            self._parts.setdefault(name, []).append((pack_mask(m), torch.tensor(count(m))))
            if done:
                blocks = self._parts.pop(name)
                self._finish(name, torch.cat([b for b, _ in blocks]), int(sum(int(n) for _, n in blocks)))
            return
        self._parts.setdefault(name, []).append((w, m))
        if not done:
            return
        blocks = self._parts.pop(name)
        w_all = _neuron_major(torch.cat([b for b, _ in blocks]), transposed).contiguous()
        m_all = _neuron_major(torch.cat([b for _, b in blocks]), transposed).contiguous()
        if not final:  # a later pair reads it (MLP chains): keep it in memory until then
            self._held[name] = (w_all, m_all)
            self.nnz_held[name] = count(m_all)
        else:
            self.writers[self.ck.file_of[name]].write(name, w_all)
            self._finish(name, pack_mask(m_all), count(m_all))

    def set_scales(self, name: str, scales: torch.Tensor) -> None:
        """A quantized matrix's scales (written with the masks at the end)."""
        if tuple(scales.shape) != self.scale_shapes.get(name):
            raise AssertionError(f"scales of {name}: {tuple(scales.shape)}, planned {self.scale_shapes.get(name)}")
        self.scales[name] = scales.to(torch.float32).contiguous()

    def set_bias(self, name: str, tensor: torch.Tensor) -> None:
        """A bias the conversion changed (children's biases; a refitted outgoing bias)."""
        self.biases[name] = tensor

    def bias(self, name: str) -> torch.Tensor:
        """The bias as the conversion left it so far (a later pair splits the refit of an earlier one)."""
        return self.biases[name] if name in self.biases else self.ck.get(name)

    def close(self, metadata: dict[str, str]) -> None:
        """Write biases, untouched tensors and masks, record the final metadata, close every file."""
        try:
            for name, b in self.biases.items():
                self.writers[self.ck.file_of[name]].write(name, b.to(b.dtype).contiguous())
            for name in self.ck.shapes:
                if name in self.nnz_written or name in self.biases:
                    continue
                writer = self.writers[self.ck.file_of[name]]
                if name in self.ck.headers:
                    writer.copy_raw(name, self.ck.headers[name], name)
                else:
                    writer.write(name, self.ck.get(name))
            for n in self.mask_names:
                self.writers[self.mask_file].write(f"{MASK_PREFIX}{n}", self.packed[n])
            missing = set(self.scale_shapes) - set(self.scales)
            if missing:
                raise AssertionError(f"no scales for {sorted(missing)}")
            for n, t in self.scales.items():
                self.writers[self.mask_file].write(f"{SCALE_PREFIX}{n}", t)
            for w in self.writers.values():
                w.set_metadata(metadata)
                w.close()
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        for w in self.writers.values():
            if not w.file.closed:
                w.abort()
