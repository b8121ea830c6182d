"""The SRU in plain PyTorch: the same recurrence, parameters and state dict as `sru.SRU`
(sru 2.6.0), for machines without a C++ compiler to build sru's kernel.

It covers the configuration the forecaster builds, sru.SRU(input_size, hidden_size,
num_layers, bidirectional) with every other argument at sru's default: no dropout, no
projection, no layer norm, identity activation, highway bias 0, skip term on, rescale off.

One layer, per direction, with d = hidden_size and x the layer's input [L, B, input_size]:

  U = x @ weight                          # [L, B, dirs, d, k]: k = 3, or 4 when input_size != dirs * d
  f[t] = sigmoid(U1[t] + v_f * c[t-1] + b_f)             forget gate
  c[t] = f[t] * c[t-1] + (1 - f[t]) * U0[t]              the only sequential step
  r[t] = sigmoid(U2[t] + v_r * c[t-1] + b_r)             reset (highway) gate
  h[t] = r[t] * c[t] + (1 - r[t]) * skip[t]              skip = x (k = 3) or U3 (k = 4)

The backward direction runs the same over reversed time. Only c is a recurrence; the reset
gate and h follow from all c at once, so the Python loop over positions does three small
tensor ops per step for all directions together. Autograd differentiates it as it is.

Parameter layout (sru's): weight [input_size, dirs * d * k], columns ordered (direction, unit,
matrix); weight_c [2 * dirs * d] = (v_f, v_r) each (direction, unit); bias likewise (b_f, b_r);
scale_x [1] is a buffer sru keeps (1.0 without rescale) and is unused here.
"""

from __future__ import annotations

import math

import torch
from torch import nn


class TorchSRUCell(nn.Module):
    """One SRU layer: x [L, B, input_size], c0 [B, dirs * d] -> (h [L, B, dirs * d], c [B, dirs * d])."""

    def __init__(self, input_size: int, hidden_size: int, bidirectional: bool = False):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.directions = 2 if bidirectional else 1
        self.output_size = hidden_size * self.directions
        # sru adds a fourth matrix for the skip term when the input cannot be added to h as it is.
        self.num_matrices = 4 if input_size != self.output_size else 3
        self.weight = nn.Parameter(torch.empty(input_size, self.output_size * self.num_matrices))
        self.weight_c = nn.Parameter(torch.empty(2 * self.output_size))
        self.bias = nn.Parameter(torch.empty(2 * self.output_size))
        self.register_buffer("scale_x", torch.ones(1))  # in sru's state dict; 1.0 without rescale
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """sru's initialisation, drawing from the random generator in the same order, so a
        seeded model starts from the same weights whichever implementation builds it."""
        self.bias.data.zero_()
        self.scale_x.data.fill_(1.0)
        bound = math.sqrt(3.0 / self.input_size)  # E[w] = 0, Var[w] = 1 / input_size
        self.weight.data.uniform_(-bound, bound)
        w = self.weight.data.view(self.input_size, -1, self.hidden_size, self.num_matrices)
        self.weight_c.data.uniform_(-math.sqrt(3.0), math.sqrt(3.0)).mul_(math.sqrt(0.5))
        w[..., 1].mul_(math.sqrt(0.5))  # the gates' input weights, scaled as weight_c is
        w[..., 2].mul_(math.sqrt(0.5))

    def forward(self, x: torch.Tensor, c0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        length, batch, _ = x.shape
        dirs, d = self.directions, self.hidden_size
        u = (x.reshape(-1, self.input_size) @ self.weight).view(length, batch, dirs, d, self.num_matrices)
        skip = u[..., 3] if self.num_matrices == 4 else x.view(length, batch, dirs, d)  # [L, B, dirs, d]
        v_f, v_r = self.weight_c.view(2, dirs, d)
        b_f, b_r = self.bias.view(2, dirs, d)
        u0, u1, u2 = u[..., 0], u[..., 1] + b_f, u[..., 2] + b_r  # [L, B, dirs, d] each
        if dirs == 2:
            # The backward direction scans reversed time: flip it, scan both directions
            # forward together, and flip its results back.
            u0, u1, u2, skip = (_flip_backward(t) for t in (u0, u1, u2, skip))
        c = x.new_zeros(batch, dirs, d) if c0 is None else c0.view(batch, dirs, d)
        c_init = c
        cs = []
        for u0_t, u1_t in zip(u0.unbind(0), u1.unbind(0)):
            f = torch.sigmoid(torch.addcmul(u1_t, c, v_f))
            c = torch.lerp(u0_t, c, f)  # u0 + f * (c_prev - u0), as sru's kernel writes it
            cs.append(c)
        c_all = torch.stack(cs)  # [L, B, dirs, d]
        c_prev = torch.cat([c_init.unsqueeze(0), c_all[:-1]])  # c[t-1] for every t
        r = torch.sigmoid(torch.addcmul(u2, c_prev, v_r))
        h = torch.lerp(skip, c_all, r)  # skip + r * (c - skip)
        if dirs == 2:
            h = _flip_backward(h)
        return h.reshape(length, batch, self.output_size), c.reshape(batch, self.output_size)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, bidirectional={self.directions == 2}"


def _flip_backward(t: torch.Tensor) -> torch.Tensor:
    """[L, B, 2, d] -> the same with direction 1 reversed in time."""
    return torch.stack([t[:, :, 0], t[:, :, 1].flip(0)], dim=2)


class TorchSRU(nn.Module):
    """Stacked SRU layers, a drop-in for sru.SRU(input_size, hidden_size, num_layers, bidirectional).

    forward: x [L, B, input_size], c0 [num_layers, B, dirs * hidden] or None ->
    (h [L, B, dirs * hidden] of the last layer, c [num_layers, B, dirs * hidden] at the end).
    """

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 2, bidirectional: bool = False):
        super().__init__()
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.num_layers = num_layers
        self.bidirectional = bidirectional
        self.output_size = hidden_size * (2 if bidirectional else 1)
        self.rnn_lst = nn.ModuleList(  # sru's attribute name: the state dicts match key for key
            TorchSRUCell(input_size if i == 0 else self.output_size, hidden_size, bidirectional)
            for i in range(num_layers))

    def forward(self, x: torch.Tensor, c0: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        if x.dim() != 3:
            raise ValueError(f"the SRU takes input [length, batch, {self.input_size}], not {list(x.shape)}")
        cs = []
        for i, layer in enumerate(self.rnn_lst):
            x, c = layer(x, None if c0 is None else c0[i])
            cs.append(c)
        return x, torch.stack(cs)
