"""Datasheet ceilings of the GPU a benchmark runs on: memory bandwidth and dense bf16 matrix rate.

A roofline is only as honest as the bandwidth it divides by: the same decode step is a larger
fraction of an H100's 3.35 TB/s than of an H200's 4.8 TB/s. The figures are the vendors' datasheet
numbers for the SXM/OAM parts (dense, no sparsity), matched on the name CUDA reports; a GPU not in
the table, or a measured ceiling, is given with --bandwidth / --bf16-flops.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Peaks:
    name: str  # the GPU's name as matched (or "given")
    bandwidth: float  # bytes/s
    bf16_dense: float  # FLOP/s

    def describe(self) -> str:
        return f"{self.name}: {self.bandwidth / 1e12:.2f} TB/s, {self.bf16_dense / 1e12:.0f} TFLOP/s bf16 dense"


# (substring of torch.cuda.get_device_name, the part's label, bytes/s, FLOP/s); first match wins,
# so the PCIe and NVL variants come before the plain name
H100_SXM = ("H100", "H100 SXM datasheet", 3.35e12, 989e12)  # where the targets were set; the default
DATASHEET = (
    ("H200", "H200 SXM datasheet", 4.8e12, 989e12),
    ("H100 PCIe", "H100 PCIe datasheet", 2.0e12, 756e12),
    ("H100 NVL", "H100 NVL datasheet", 3.9e12, 835e12),
    H100_SXM,
    ("A100-SXM4-80GB", "A100 80GB SXM datasheet", 2.039e12, 312e12),
    ("A100", "A100 40GB datasheet", 1.555e12, 312e12),
    ("L40S", "L40S datasheet", 0.864e12, 362e12),
)


def gpu_peaks(device: torch.device, bandwidth: float | None = None, bf16_flops: float | None = None) -> Peaks:
    """The datasheet ceilings of `device`'s GPU (`peaks_of` its name)."""
    return peaks_of(torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu", bandwidth, bf16_flops)


def peaks_of(gpu: str, bandwidth: float | None = None, bf16_flops: float | None = None) -> Peaks:
    """The datasheet ceilings of the GPU named `gpu` (as CUDA names it), each replaced by the given
    value where one is given. A GPU not in the table gets the H100 SXM's figures, named as such."""
    match = next((row for row in DATASHEET if row[0] in gpu), None)
    _, label, bw, flops = match or H100_SXM
    if match is None:
        label = f"{gpu} not in the table: {H100_SXM[1]}"
    given = [what for what, value in (("bandwidth", bandwidth), ("bf16 rate", bf16_flops)) if value]
    if given:
        label = f"{label}, given: {' and '.join(given)}"
    return Peaks(label, bandwidth or bw, bf16_flops or flops)
