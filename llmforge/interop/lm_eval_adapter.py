"""lm-evaluation-harness model "llmforge": standard benchmarks on llmforge checkpoints.

    python -m llmforge.interop.lm_eval_adapter --model llmforge \\
        --model_args checkpoint=runs/x/ckpt/sft,batch_size=8 --tasks hellaswag,arc_easy

(the same arguments as `lm_eval`; this entry point imports the adapter so the harness knows
the "llmforge" model type; from Python, `import llmforge.interop.lm_eval_adapter` and call
`lm_eval.simple_evaluate(model="llmforge", ...)`). Model args: checkpoint (a checkpoint folder
or run directory), device (cpu), batch_size (8), max_length (the model's context).

The three request types:
  loglikelihood(context, continuation)  sum of log p(continuation tokens | context) and whether
                                        each was the argmax (multiple-choice tasks)
  loglikelihood_rolling(text)           log p(text) over context-sized windows (perplexity tasks)
  generate_until(context, gen_kwargs)   greedy (or sampled) text through infer/engine.py, cut at
                                        the `until` strings

Contexts start with the token documents start with in training: <|eot|> for llmforge's own
models (pretraining puts it between documents), the original BOS for imported ones; a prompt
that already begins with <|bos|> (`--apply_chat_template`) is left as it is. Text is
encoded with the chat special tokens recognised, so `--apply_chat_template` prompts (rendered
with llmforge's template) reach the model as the special tokens it was trained on.
"""
from __future__ import annotations

import re
import warnings

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import LM
    from lm_eval.api.registry import register_model
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError("the lm_eval adapter needs lm-evaluation-harness: pip install lm-eval") from e

from llmforge.interop.hf import load_policy
from llmforge.train.checkpoint import load_tokenizer

CHAT_SPECIALS = ["<|bos|>", "<|eot|>", "<|system|>", "<|user|>", "<|assistant|>",
                 "<|tool_call|>", "<|tool_result|>", "<|end|>"]


@register_model("llmforge")
class LLMForgeLM(LM):
    def __init__(self, checkpoint: str, device: str = "cpu", batch_size: int | str = 8,
                 max_length: int | None = None, **_ignored):
        super().__init__()
        if str(device).startswith("cuda") and not torch.cuda.is_available():
            # lm_eval's CLI passes --device cuda unless told otherwise
            warnings.warn(f"device {device!r} requested but CUDA is not available; running on cpu")
            device = "cpu"
        self.model, self.config, self.folder = load_policy(checkpoint, device=device)
        self.model.eval()
        self.tok = load_tokenizer(self.folder)
        self._device = torch.device(device)
        self.batch_size = int(batch_size) if str(batch_size).isdigit() else 8  # "auto" -> 8
        self.max_length = int(max_length or self.model.cfg.max_seq_len)
        hf_bos = (self.config.get("hf") or {}).get("bos_token_id")
        self.prefix = [hf_bos] if isinstance(hf_bos, int) else [self.tok.eot_id]
        self.specials = {s: i for s in CHAT_SPECIALS if (i := self.tok.hf.token_to_id(s)) is not None}
        self._special_split = re.compile("(" + "|".join(map(re.escape, self.specials)) + ")") if self.specials else None

    # ------------------------------------------------------------ text <-> ids
    def encode(self, text: str) -> list[int]:
        if not self._special_split:
            return self.tok.encode(text)
        ids: list[int] = []
        for piece in self._special_split.split(text):
            if piece in self.specials:
                ids.append(self.specials[piece])
            elif piece:
                ids += self.tok.encode(piece)
        return ids

    def with_prefix(self, ids: list[int]) -> list[int]:
        """Ids as a document starts in training: after the prefix token, unless the text already
        begins with <|bos|> (a chat-template prompt, as SFT conversations begin)."""
        if ids and ids[0] == self.specials.get("<|bos|>"):
            return ids
        return self.prefix + ids

    def encode_pair(self, context: str, continuation: str) -> tuple[list[int], list[int]]:
        """Context and continuation ids split where the whole string's tokens split, so a merge
        across the boundary is not counted twice; trailing context spaces move to the continuation."""
        n_spaces = len(context) - len(context.rstrip(" "))
        if n_spaces:
            context, continuation = context[:-n_spaces], context[-n_spaces:] + continuation
        whole = self.encode(context + continuation)
        ctx = self.encode(context)
        if whole[:len(ctx)] != ctx:  # the boundary token merged: encode the halves apart
            return self.with_prefix(ctx), self.encode(continuation)
        return self.with_prefix(ctx), whole[len(ctx):]

    @property
    def tokenizer_name(self) -> str:
        return f"llmforge-{self.tok.hash[:12]}"

    def apply_chat_template(self, chat_history: list[dict], add_generation_prompt: bool = True) -> str:
        template = self.config.get("chat_template")
        if template:  # an imported model's own template, rendered as transformers does
            return _render_hf_template(template, chat_history, add_generation_prompt, self.config)
        from llmforge.tokenizer.chat import render_text
        return render_text(chat_history, add_generation_prompt=add_generation_prompt)

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        from llmforge.tokenizer.chat import CHAT_TEMPLATE
        return self.config.get("chat_template") or CHAT_TEMPLATE

    # ------------------------------------------------------------ scoring
    @torch.no_grad()
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(sum log p(cont | ctx), cont is the greedy continuation) per (ctx ids, cont ids)."""
        results: list[tuple[float, bool] | None] = [None] * len(pairs)
        order = sorted(range(len(pairs)), key=lambda i: -len(pairs[i][0]) - len(pairs[i][1]))
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            rows, spans = [], []
            for i in chunk:
                ctx, cont = pairs[i]
                cont = cont[-self.max_length:]
                whole = (ctx + cont)[-(self.max_length + 1):]
                rows.append(whole[:-1])          # inputs; position t predicts whole[t + 1]
                spans.append((len(whole) - 1 - len(cont), cont))
            width = max(len(r) for r in rows)
            batch = torch.full((len(rows), width), self.tok.eot_id, dtype=torch.long)
            for r, row in enumerate(rows):
                batch[r, :len(row)] = torch.tensor(row)
            logits = self.model(batch.to(self._device))
            for r, i in enumerate(chunk):
                first, cont = spans[r]
                target = torch.tensor(cont)
                # softmax over the continuation positions only: (B, T, V) in fp32 would not fit
                # for a real vocabulary and context
                lp = F.log_softmax(logits[r, first:first + len(cont)].float(), dim=-1).cpu()
                total = float(lp.gather(1, target[:, None]).sum())
                greedy = bool((lp.argmax(-1) == target).all())
                results[i] = (total, greedy)
        return results

    def loglikelihood(self, requests) -> list[tuple[float, bool]]:
        pairs = []
        for req in requests:
            context, continuation = req.args
            if context:
                pairs.append(self.encode_pair(context, continuation))
            else:
                pairs.append((list(self.prefix), self.encode(continuation)))
        return self._score(pairs)

    def loglikelihood_rolling(self, requests) -> list[float]:
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        out = []
        for req in requests:
            (text,) = req.args
            windows = [make_disjoint_window(w) for w in get_rolling_token_windows(
                token_list=self.encode(text), prefix_token=self.prefix[0], max_seq_len=self.max_length,
                context_len=1)]
            out.append(sum(score for score, _ in self._score(windows)))
        return out

    # ------------------------------------------------------------ generation
    def generate_until(self, requests) -> list[str]:
        from llmforge.infer.engine import Engine
        from llmforge.infer.sampling import SamplingParams

        engine = Engine(self.model, self.tok, max_batch=self.batch_size, max_len=self.max_length)
        stop_ids = [self.specials[s] for s in ("<|eot|>", "<|end|>") if s in self.specials]
        prompts, params, stops = [], [], []
        for req in requests:
            context, gen_kwargs = req.args
            kwargs = dict(gen_kwargs or {})
            until = kwargs.get("until") or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.get("max_gen_toks", 256))
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample") else 0.0
            # keep the end of the prompt; generation gets at most half the context, so a small
            # model's window is not all spent on room for max_gen_toks (256 by default)
            room = max(1, min(max_new, self.max_length // 2))
            prompt = self.with_prefix(self.encode(context))[-(self.max_length - room):]
            prompts.append(prompt)
            params.append(SamplingParams(max_tokens=min(max_new, self.max_length - len(prompt)),
                                         temperature=temperature, seed=0,
                                         stop=until, stop_token_ids=stop_ids))
            stops.append(until)
        outputs = []
        for completion, until in zip(engine.generate(prompts, params), stops):
            text = completion.text
            for s in until:  # cut at the first stop string, whatever the engine already did
                if s and s in text:
                    text = text[:text.index(s)]
            outputs.append(text)
        return outputs


def _render_hf_template(template: str, messages: list[dict], add_generation_prompt: bool, config: dict) -> str:
    """A Hub chat template in a sandbox with the helpers such templates use (raise_exception,
    tojson without HTML escaping) and the special tokens they reference."""
    import json

    from jinja2.exceptions import TemplateError
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, separators=None, sort_keys=False, ensure_ascii=False: json.dumps(
        x, indent=indent, separators=separators, sort_keys=sort_keys, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = raise_exception
    tok_cfg = (config.get("hf") or {}).get("tokenizer_config") or {}
    specials = {k: (v.get("content") if isinstance(v, dict) else v) for k, v in tok_cfg.items()
                if k in ("bos_token", "eos_token", "pad_token", "unk_token")}
    return env.from_string(template).render(messages=messages, add_generation_prompt=add_generation_prompt,
                                            **specials)


def main(argv: list[str] | None = None) -> None:
    """`lm_eval` with the "llmforge" model registered."""
    import sys

    from lm_eval.__main__ import cli_evaluate
    if argv is not None:
        sys.argv = [sys.argv[0], *argv]
    cli_evaluate()


if __name__ == "__main__":
    main()
