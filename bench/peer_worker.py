"""A peer engine in a persistent process of its own, for bench/peers.py (runs in the peer's venv).

    .peers/vllm/bin/python bench/peer_worker.py vllm
    .peers/ct2/bin/python bench/peer_worker.py ct2

Reads one JSON object per line on stdin, answers one per line on stdout (nothing else is printed there:
the engines' own output goes to stderr). Only the standard library at import time: the engine is
imported by `load`.

  {"op": "load", "model": DIR, "dtype": "float32"|"bfloat16", "threads": 2, ...}   -> {"ok": true, ...}
      vllm: "block_size" (null: its default), "prefix_caching" (bool), "max_len"
      ct2:  "compute_type" ("float32", "int8", "bfloat16"); DIR is an HF checkpoint, converted here once
  {"op": "generate", "prompts": [[token ids], ...], "new_tokens": N}
      -> {"seconds": wall time of the call, "tokens": [[new token ids], ...]}   (greedy, EOS ignored)
  {"op": "quit"}
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


class Vllm:
    def __init__(self, req: dict) -> None:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process: no busy engine loop
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(req.get("kv_gib", 2)))
        os.environ.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"0-{req.get('threads', 2) - 1}")
        from vllm import LLM, SamplingParams

        more = {} if req.get("block_size") is None else {"block_size": req["block_size"]}
        self.llm = LLM(
            model=req["model"],
            dtype=req["dtype"],
            enable_prefix_caching=bool(req.get("prefix_caching", False)),
            max_model_len=req.get("max_len", 1088),
            max_num_seqs=req.get("max_seqs", 64),
            seed=0,
            **more,
        )
        self.params = SamplingParams
        self.info = {"block_size": self.llm.llm_engine.vllm_config.cache_config.block_size}

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        params = self.params(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        outs = self.llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


class Ct2:
    def __init__(self, req: dict) -> None:
        import ctranslate2
        from transformers import AutoTokenizer

        out = Path(req["model"]) / f"ct2-{req['compute_type']}"
        if not (out / "model.bin").exists():
            converter = ctranslate2.converters.TransformersConverter(req["model"])
            converter.convert(str(out), quantization=req["compute_type"], force=True)
        self.tok = AutoTokenizer.from_pretrained(req["model"])
        self.gen = ctranslate2.Generator(
            str(out), device="cpu", compute_type=req["compute_type"], intra_threads=req.get("threads", 2)
        )
        self.info = {"compute_type": self.gen.compute_type}

    def generate(self, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
        tokens = [self.tok.convert_ids_to_tokens(p) for p in prompts]
        results = self.gen.generate_batch(
            tokens,
            max_length=new_tokens,
            min_length=new_tokens,  # EOS ignored: exactly new_tokens
            sampling_topk=1,
            include_prompt_in_result=False,
            max_batch_size=len(prompts),
        )
        return [list(r.sequences_ids[0]) for r in results]


ENGINES = {"vllm": Vllm, "ct2": Ct2}


def main() -> None:
    kind = sys.argv[1]
    out = sys.stdout
    sys.stdout = sys.stderr  # whatever the engine prints stays off the protocol
    engine = None
    for line in sys.stdin:
        req = json.loads(line)
        try:
            if req["op"] == "load":
                engine = ENGINES[kind](req)
                reply = {"ok": True, **engine.info}
            elif req["op"] == "generate":
                t0 = time.perf_counter()
                tokens = engine.generate(req["prompts"], req["new_tokens"])
                reply = {"seconds": time.perf_counter() - t0, "tokens": tokens}
            else:
                return
        except Exception as exc:  # reported to the benchmark, which prints it as the column's error
            reply = {"error": f"{type(exc).__name__}: {exc}"}
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
