"""Read-back speed (issue #26 item 2): the float model against the same W8A8 checkpoint read back by our reader,
decoding weights at every forward and keeping them decoded (as `msmodelslim eval` does), in one process with the
three models' windows interleaved, so the machine's drift hits all of them alike.

    python benchmarks/read_back_speed.py [--model DIR] [--quant DIR] [--windows 4] [--rounds 5] [--new_tokens 64]

Defaults: the demo's cached SmolLM2 and its W8A8 output (run `msmodelslim demo` first). Prints the median
seconds per 512-token window of each row and its ratio to float, whether the read-backs agree bit for bit, and
the median of --rounds greedy generations of --new_tokens tokens from each model (interleaved too). The row
"codes per layer" is the kept-decoded read-back with each layer quantizing its own input (no LastInputCodes).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

DEMO = Path.home() / ".cache" / "msmodelslim" / "demo"
TEXT = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "debian-reference.eval.txt"


def main() -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from msmodelslim.format.ascendv1.reader import load_ascendv1
    from msmodelslim.ir.quant_linear import QuantLinear, keep_decoded_weights

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=DEMO / "SmolLM2-135M-Instruct")
    parser.add_argument("--quant", type=Path, default=DEMO / "SmolLM2-135M-Instruct-w8a8")
    parser.add_argument("--text", type=Path, default=TEXT)
    parser.add_argument("--windows", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--new_tokens", type=int, default=64)
    args = parser.parse_args()

    tokenizer = AutoTokenizer.from_pretrained(args.model)
    ids = tokenizer(args.text.read_text()[:400_000], return_tensors="pt").input_ids
    windows = ids[:, : 512 * args.windows].reshape(args.windows, 512)
    unshared = keep_decoded_weights(load_ascendv1(args.quant).eval())
    for module in unshared.modules():  # each layer quantizes its own input, as before LastInputCodes
        if isinstance(module, QuantLinear):
            module.input_codes = None
    models = {"float": AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval(),
              "read back, decoded every forward": load_ascendv1(args.quant).eval(),
              "read back, kept decoded, codes per layer": unshared,
              "read back, kept decoded (eval)": keep_decoded_weights(load_ascendv1(args.quant).eval())}
    seconds: dict[str, list[float]] = {name: [] for name in models}
    with torch.no_grad():
        logits = [models[n](windows[:1]).logits for n in list(models)[1:]]  # also warms every model up
        models["float"](windows[:1])
        for _ in range(args.rounds):
            for name, model in models.items():
                start = time.perf_counter()
                for window in windows:
                    model(window[None])
                seconds[name].append((time.perf_counter() - start) / len(windows))
    base = statistics.median(seconds["float"])
    print(f"{args.windows} windows x 512 tokens, {args.rounds} interleaved rounds, {torch.get_num_threads()} threads")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:40s} median {median:.3f} s/window  x{median / base:.2f} of float  "
              f"(rounds: {', '.join(f'{v:.3f}' for v in values)})")
    print(f"the read-backs agree bit for bit: {all(torch.equal(logits[0], other) for other in logits[1:])}")
    prompt = tokenizer("The Debian package manager", return_tensors="pt").input_ids
    generation: dict[str, list[float]] = {name: [] for name in models}
    tokens = {}
    for _ in range(args.rounds):  # greedy generation, one token at a time, the models interleaved
        for name, model in models.items():
            start = time.perf_counter()
            tokens[name] = model.generate(prompt, max_new_tokens=args.new_tokens, do_sample=False,
                                          pad_token_id=tokenizer.eos_token_id)
            generation[name].append(time.perf_counter() - start)
    base = statistics.median(generation["float"])
    for name, values in generation.items():
        median = statistics.median(values)
        print(f"{name:40s} {args.new_tokens} greedy tokens: median {median:.2f} s  x{median / base:.2f} of float, "
              f"best {min(values):.2f} s  (rounds: {', '.join(f'{v:.2f}' for v in values)})")
    quantized = [t for n, t in tokens.items() if n != "float"]
    print(f"the read-backs generate the same tokens: {all(torch.equal(quantized[0], t) for t in quantized[1:])}")


if __name__ == "__main__":
    main()
