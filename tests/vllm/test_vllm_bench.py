"""``speccascade bench --vllm``'s table: the derived figures against hand-computed values (the
measurement itself is a benchmark, not a test; it needs no vLLM here)."""
from __future__ import annotations

from speccascade_fast.bench import vllm as bench


def test_markdown_derives_speed_up_acceptance_and_agreement():
    rows = [bench.Row("vllm", 1, 4, 200, 20.0), bench.Row("vllm-spec", 1, 4, 200, 10.0, 120, 30),
            bench.Row("token_v3", 1, 4, 200, 8.0, 100, 75, same_as_vllm=0.5),
            bench.Row("vllm", 8, 4, 200, 5.0)]
    assert rows[1].tokens_per_s == 20.0 and rows[1].acceptance == 0.25
    result = {"prompts": 4, "max_new_tokens": 50, "temperature": 0.0, "gamma": 4, "alpha": 0.3,
              "dtype": "bfloat16",
              "rows": [vars(r) | {"tokens_per_s": r.tokens_per_s, "acceptance": r.acceptance}
                       for r in rows]}
    table = bench.markdown(result).splitlines()
    assert table[4] == "| vllm | 1 | 200 | 20.0 | 10.00 | 1.00x | – | – |"
    assert table[5] == "| vllm-spec | 1 | 200 | 10.0 | 20.00 | 2.00x | 0.250 | – |"
    assert table[6] == "| token_v3 | 1 | 200 | 8.0 | 25.00 | 2.50x | 0.750 | 50 % |"
    assert table[7] == "| vllm | 8 | 200 | 5.0 | 40.00 | 1.00x | – | – |"
