"""--speculative-ngram through a real server (the engine core in its own process): greedy
tokens equal the dense no-cache oracle, and the draft counters cross the seam to
/metrics; bad speculative settings are refused by name."""

# Fixtures come from server_helpers; pytest injects them by parameter name.
# ruff: noqa: F811
from __future__ import annotations

import httpx
import pytest

from palm_serve.server.settings import Settings

from server_helpers import metric, model_dir, oracle, parse_metrics, running_server  # noqa: F401

PROMPTS = [[5, 6, 7, 8] * 4, [9, 10] * 6, [11, 12, 13, 14, 15, 16, 17] * 2, [20]]


def test_greedy_tokens_equal_the_oracle_and_drafts_are_counted(model_dir, oracle) -> None:
    spec = dict(speculative_ngram=True, speculative_max_running=64, compile=False)
    with running_server(model_dir, **spec) as server:
        with httpx.Client(timeout=60) as client:
            for prompt in PROMPTS:
                body = dict(prompt=prompt, max_tokens=24, temperature=0, ignore_eos=True)
                out = client.post(f"{server.url}/v1/generate", json=body).json()
                assert out["token_ids"] == oracle.greedy(prompt, 24), prompt
            m = parse_metrics(client.get(f"{server.url}/metrics").text)
    drafts = metric(m, "palm_spec_decode_num_draft_tokens_total")
    accepted = metric(m, "palm_spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and 0 < accepted <= drafts
    assert metric(m, "palm_spec_decode_acceptance_ratio") == pytest.approx(accepted / drafts)


@pytest.mark.parametrize(
    "values, field",
    [
        (dict(num_speculative_tokens=0), "num_speculative_tokens"),
        (dict(ngram_min=0), "ngram_min"),
        (dict(ngram_min=3, ngram_max=2), "ngram_max"),
        (dict(speculative_max_running=0), "speculative_max_running"),
    ],
)
def test_bad_speculative_settings_name_the_field(values, field) -> None:
    with pytest.raises(ValueError, match=field):
        Settings(**values)
