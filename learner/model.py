"""The policy with a value head, and the frozen reference model.

Notation: B = sequences, L = prompt + response tokens (right-padded), V = vocabulary, H = hidden size.

``PolicyWithValue`` wraps any HF causal LM. The paper's critic is a linear layer on the policy's
last hidden state ("shared"); its ablation gives the critic its own backbone ("separate", a second
copy of the same checkpoint). Either way the module's outputs are per POSITION: position t has
seen tokens 0..t, so ``logits[:, t]`` is the distribution of token t + 1 and ``values[:, t]`` is the
value of the state in which token t + 1 is chosen. ``learner.worker.token_outputs`` moves them onto
the token they are about; nothing else shifts.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import Callable, ContextManager, NamedTuple, Optional

from torch import Tensor, nn
from transformers import PreTrainedModel

from formats.hf import load_causal_lm


class Output(NamedTuple):
    logits: Tensor  # (B, L, V): logits[:, t] score token t + 1
    values: Optional[Tensor]  # (B, L) float32: V(state after tokens 0..t); None without a value head


def load_reference(path_or_id: str, dtype: str) -> PreTrainedModel:
    """pi_ref: a frozen copy of the warm-up checkpoint (eval mode, no gradients, no optimizer)."""
    model = load_causal_lm(path_or_id, dtype)
    model.eval()
    model.requires_grad_(False)
    return model


class PolicyWithValue(nn.Module):
    """An HF causal LM plus ``nn.Linear(H, 1)`` reading the last hidden state of the policy
    ("shared") or of a separate critic backbone ("separate").

    The head starts at zero (weight and bias): the first values are 0 instead of noise, and,
    with a shared backbone, the first value-loss gradients reaching the warm-up policy through the
    head are exactly 0 (they are proportional to the head's weight). A random head would push the
    pretrained features around with a loss weighted 5x (``vf_coef``) before the critic has learnt
    anything.
    """

    def __init__(self, lm: PreTrainedModel, critic: Optional[PreTrainedModel] = None, with_value: bool = True):
        super().__init__()
        self.lm = lm
        self.critic = critic
        self.value_head = None   # with_value=False: the policy alone (SFT; GRPO/RLOO need no critic)
        if with_value:
            backbone = critic if critic is not None else lm
            self.value_head = nn.Linear(backbone.config.hidden_size, 1, dtype=backbone.dtype)
            nn.init.zeros_(self.value_head.weight)
            nn.init.zeros_(self.value_head.bias)

    @classmethod
    def from_pretrained(cls, path_or_id: str, value_head: str, dtype: str) -> "PolicyWithValue":
        """``value_head``: "shared", "separate" or "none" (``learner.config.VALUE_HEADS``)."""
        critic = load_causal_lm(path_or_id, dtype, base_only=True) if value_head == "separate" else None
        return cls(load_causal_lm(path_or_id, dtype), critic, with_value=value_head != "none")

    def gradient_checkpointing_enable(self) -> None:
        # Non-reentrant checkpointing: works with inputs that do not require grad and with ZeRO-3.
        kwargs = {"use_reentrant": False}
        self.lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        if self.critic is not None:
            self.critic.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def forward(self, input_ids: Tensor, attention_mask: Tensor) -> Output:
        """input_ids, attention_mask: (B, L), right-padded. Returns per-position Output."""
        shared = self.value_head is not None and self.critic is None
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, output_hidden_states=shared)
        if self.value_head is None:
            values = None
        elif shared:
            values = self._head(out.hidden_states[-1])  # (B, L, H) after the final norm
        else:
            values = self.values(input_ids, attention_mask)
        return Output(logits=out.logits, values=values)

    def values(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, L) float32 values alone: with a separate critic, only its backbone runs (the
        learner's scoring pass when PPO's old log-probs are the sampler's)."""
        if self.value_head is None:
            raise RuntimeError("values() on a policy built without a value head (learner.value_head = none)")
        if self.critic is None:
            return self.forward(input_ids, attention_mask).values
        hidden = self.critic(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return self._head(hidden)

    def _head(self, hidden: Tensor) -> Tensor:
        return self.value_head(hidden).squeeze(-1).float()  # (B, L)

    def state_dict_for_inference(
        self,
        gather: Callable[[list[nn.Parameter]], ContextManager] = lambda params: nullcontext(),
        keep: bool = True,
    ) -> Optional[dict[str, Tensor]]:
        """The policy's weights under the HF model's own ``state_dict`` names (tied weights under
        each of their names), copied to CPU; no value head, no critic. What a sampler loads.

        Args:
            gather: given one parameter, a context manager inside which its full value is readable
                (``deepspeed.zero.GatheredParameters`` under ZeRO-3, where each rank holds a
                slice). Called for every parameter in turn, so at most one whole tensor is
                gathered at a time. The default suits whole parameters.
            keep: whether this process keeps the copy; under ZeRO-3 every rank must take part in
                each gather, but only one needs the result.
        Returns:
            {name: tensor} when ``keep``, else None.
        Raises:
            RuntimeError: if the names found differ from ``self.lm.state_dict()``'s.
        """
        return gathered_state_dict(self.lm, gather, keep)


def gathered_state_dict(
    module: nn.Module,
    gather: Callable[[list[nn.Parameter]], ContextManager] = lambda params: nullcontext(),
    keep: bool = True,
) -> Optional[dict[str, Tensor]]:
    """``module``'s weights under its own ``state_dict`` names (tied weights under each of their
    names), copied to CPU one parameter at a time inside ``gather([param])``; {name: tensor} when
    ``keep``, else None (see ``PolicyWithValue.state_dict_for_inference``). Raises RuntimeError if
    the names found differ from ``module.state_dict()``'s."""
    expected = list(module.state_dict().keys())  # under ZeRO-3: names and empty slices
    out: dict[str, Optional[Tensor]] = {}
    copied: dict[int, Optional[Tensor]] = {}  # id(parameter) -> copy: a tied weight is gathered once
    for name, param in module.named_parameters(remove_duplicate=False):
        if id(param) not in copied:
            with gather([param]):
                copied[id(param)] = param.detach().to("cpu", copy=True) if keep else None
        out[name] = copied[id(param)]
    persistent = set(expected)  # state_dict leaves out non-persistent buffers (rotary tables)
    for name, buf in module.named_buffers():
        if name in persistent:
            out[name] = buf.detach().to("cpu", copy=True) if keep else None
    if set(out) != set(expected):
        raise RuntimeError(
            "exported names differ from the module's state_dict: missing "
            f"{sorted(set(expected) - set(out))}, unexpected {sorted(set(out) - set(expected))}"
        )
    return {name: out[name] for name in expected} if keep else None
