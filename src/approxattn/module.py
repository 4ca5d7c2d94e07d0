"""The base class of every attention method and the random-feature redraw policy."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from .registry import MethodSpec, causal_methods
from .validation import AttentionShape, check_inputs


class AttentionModule(nn.Module):
    """An attention method with whatever state it owns (random features, projections, ...).

    ``forward(q, k, v, *, causal=False, key_padding_mask=None, scale=None)`` takes
    q ``(B, Hq, Nq, d)``, k ``(B, Hkv, Nk, d)``, v ``(B, Hkv, Nk, dv)`` with Hq a multiple
    of Hkv, a ``(B, Nk)`` bool padding mask (True = keep), and returns ``(B, Hq, Nq, dv)``
    in the dtype of q.

    Subclasses implement :meth:`attend`, which receives validated inputs. A subclass
    with ``native_gqa = False`` sees k and v already repeated to Hq heads; one with
    ``native_gqa = True`` shares each key/value head across its query group itself.
    """

    spec: ClassVar[MethodSpec]
    native_gqa: ClassVar[bool] = False

    def __init__(self, *, head_dim: int, **options: Any) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.options = dict(options)

    def extra_repr(self) -> str:
        return f"head_dim={self.head_dim}, " + ", ".join(f"{k}={v!r}" for k, v in self.options.items())

    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> torch.Tensor:
        shape, scale_value = check_inputs(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale)
        return self.forward_checked(q, k, v, shape, scale_value, causal=causal,
                                    key_padding_mask=key_padding_mask, scale_given=scale is not None)

    def attention_matrices(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool = False,
        key_padding_mask: torch.Tensor | None = None,
        scale: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """Dense ``(B, Hq, Nq, Nk)`` views of what this call attends to (quadratic: small N only).

        ``"attention"`` is the matrix A with ``forward(q, k, v) = A @ v``. The default forms it by
        attending to the identity (v = I, dv = Nk), which holds for every method whose output is
        linear in v *and* whose weights do not depend on v; a method whose weights do (SEA: its
        mask comes from an estimate over [probe, v]) overrides this and may add more views.
        """
        batch, kv_heads, nk, _ = k.shape
        eye = torch.eye(nk, dtype=q.dtype, device=q.device).expand(batch, kv_heads, nk, nk)
        return {"attention": self.forward(q, k, eye, causal=causal, key_padding_mask=key_padding_mask, scale=scale)}

    def forward_checked(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        shape: AttentionShape,
        scale: float,
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        scale_given: bool,
    ) -> torch.Tensor:
        """``forward`` for inputs already passed through :func:`check_inputs` (which gave
        ``shape`` and the resolved ``scale``): the method-specific checks, then the method."""
        if shape.head_dim != self.head_dim:
            raise ValueError(
                f"q: expected head_dim {self.head_dim} (this {self.spec.name!r} module was built for it), "
                f"got {shape.head_dim}"
            )
        if causal and not self.spec.supports_causal:
            raise NotImplementedError(
                f"method {self.spec.name!r} does not support causal=True; methods that do: "
                + ", ".join(causal_methods())
            )
        if scale_given and not self.spec.uses_scale:
            raise ValueError(
                f"scale: method {self.spec.name!r} has no softmax temperature (its feature map is "
                f"scale-free); expected None, got {scale!r}"
            )
        self.before_call()
        if not self.native_gqa and shape.groups > 1:
            k = k.repeat_interleave(shape.groups, dim=1)
            v = v.repeat_interleave(shape.groups, dim=1)
        out = self.attend(q, k, v, causal=causal, key_padding_mask=key_padding_mask, scale=scale, shape=shape)
        return out.to(q.dtype)

    def before_call(self) -> None:
        """Hook run before every forward call (the redraw policy lives here)."""

    def replays_in_training(self) -> bool:
        """Whether a CUDA graph of a training forward, captured once and replayed every step, computes
        what calling the module every step would. False where the forward keeps host-side state that
        changes from call to call (a redraw schedule): a graph would keep the captured call's choice."""
        return True

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        *,
        causal: bool,
        key_padding_mask: torch.Tensor | None,
        scale: float,
        shape: AttentionShape,
    ) -> torch.Tensor:
        raise NotImplementedError


def _forget_host_count(module: "RandomFeatureModule", incompatible_keys) -> None:
    module._calls = None  # a loaded state_dict brings its own call count


class RandomFeatureModule(AttentionModule):
    """An attention module that owns random features and redraws them by a stated policy.

    Policy (option ``redraw``): ``"never"``; ``"every_call"``; or an int R, redraw after every
    R training calls. Nothing is ever redrawn in eval mode. Draw t uses a generator seeded
    with ``(seed, t)``, so a module is reproducible from its seed and its ``state_dict``
    (which holds the current features and the call and draw counters).
    """

    def __init__(self, *, head_dim: int, **options: Any) -> None:
        super().__init__(head_dim=head_dim, **options)
        self.register_buffer("training_calls", torch.zeros((), dtype=torch.long))
        self.register_buffer("feature_draws", torch.zeros((), dtype=torch.long))
        # the call count on the host, so the redraw decision never reads a GPU buffer (a sync per
        # training call); read from the buffer once, on the first call after construction or a load
        self._calls: int | None = None
        self.register_load_state_dict_post_hook(_forget_host_count)

    def generator(self, draw: int) -> torch.Generator:
        gen = torch.Generator()
        gen.manual_seed(int(self.options["seed"]) * 1_000_003 + draw)
        return gen

    def draw_features(self, generator: torch.Generator) -> None:
        """Fill the module's random buffers from ``generator`` (on CPU, then copied)."""
        raise NotImplementedError

    def redraw_features(self) -> None:
        """Draw the next set of random features now, whatever the policy."""
        self.feature_draws += 1
        self.draw_features(self.generator(int(self.feature_draws)))

    def replays_in_training(self) -> bool:
        return self.options["redraw"] == "never"

    def before_call(self) -> None:
        if not self.training:
            return
        policy = self.options["redraw"]
        if self._calls is None:
            self._calls = int(self.training_calls)
        self._calls += 1
        # the stored count, updated on the device without a sync (and counted by CUDA-graph replays)
        self.training_calls.add_(1)
        if policy == "every_call" or (isinstance(policy, int) and self._calls % policy == 0):
            self.redraw_features()
