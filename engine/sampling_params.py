"""SamplingParams: how one request wants its tokens chosen and when it stops."""

from __future__ import annotations

from dataclasses import dataclass

GREEDY_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class StructuredOutputSpec:
    """What the output must match: exactly one of a JSON schema (its JSON text), a regular
    expression, a list of choices, or a Lark grammar (llguidance's dialect). Plain data: it
    crosses the process seam inside SamplingParams and keys the compile caches."""

    json_schema: str | None = None
    regex: str | None = None
    choice: tuple[str, ...] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        given = [
            v for v in (self.json_schema, self.regex, self.choice, self.grammar) if v is not None
        ]
        if len(given) != 1:
            raise ValueError(
                "structured_output must set exactly one of json_schema, regex, choice, grammar"
            )
        if self.choice is not None and not self.choice:
            raise ValueError("structured_output choice must list at least one string")


@dataclass(frozen=True)
class SamplingParams:
    max_tokens: int = 16
    # 0 (or below GREEDY_TEMPERATURE) means greedy (argmax); the filters then do nothing.
    temperature: float = 1.0
    top_p: float = 1.0
    # 0 disables top-k.
    top_k: int = 0
    min_p: float = 0.0
    # > 1 discourages tokens already in the prompt or output (CTRL-style, sign-aware).
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # A seeded request draws from its own generator: its tokens do not depend on the batch.
    seed: int | None = None
    # Strings that end generation; matched across token boundaries and never emitted.
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    # None: no logprobs; 0: the chosen token's; N: it and the top N alternatives.
    logprobs: int | None = None
    # Same, for every prompt token after the first.
    prompt_logprobs: int | None = None
    # Constrained decoding: only tokens that keep the output matching this are sampled.
    structured_output: StructuredOutputSpec | None = None

    def __post_init__(self) -> None:
        checks = [
            (self.max_tokens >= 1, "max_tokens", "must be >= 1"),
            (self.temperature >= 0, "temperature", "must be >= 0"),
            (0 < self.top_p <= 1, "top_p", "must be in (0, 1]"),
            (self.top_k >= 0, "top_k", "must be >= 0 (0 disables it)"),
            (0 <= self.min_p <= 1, "min_p", "must be in [0, 1]"),
            (self.repetition_penalty > 0, "repetition_penalty", "must be > 0"),
            (-2 <= self.presence_penalty <= 2, "presence_penalty", "must be in [-2, 2]"),
            (-2 <= self.frequency_penalty <= 2, "frequency_penalty", "must be in [-2, 2]"),
            (self.logprobs is None or 0 <= self.logprobs <= 20, "logprobs", "must be in [0, 20]"),
            (
                self.prompt_logprobs is None or 0 <= self.prompt_logprobs <= 20,
                "prompt_logprobs",
                "must be in [0, 20]",
            ),
            (all(isinstance(s, str) and s for s in self.stop), "stop", "must be non-empty strings"),
        ]
        for ok, field, why in checks:
            if not ok:
                raise ValueError(f"{field} {why}, got {getattr(self, field)!r}")

    @property
    def greedy(self) -> bool:
        """Temperatures below GREEDY_TEMPERATURE are greedy: dividing logits by a tinier
        number overflows them (as vLLM does, with the same threshold)."""
        return self.temperature < GREEDY_TEMPERATURE
