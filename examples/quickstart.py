"""The README's Python example: a 4K-token passkey prompt through TCA on the embedded model."""
import tca_attention as tca
from tca_attention.data.passkey import passkey_prompt

model, tok = tca.load_model("smollm2")  # packaged real model; also a .gguf file or a HF directory
# the default configuration, "tca:last_q=16,span=7" ("tca" alone: the paper's rule); calibrates
# once, then loads the cached budgets
method = tca.create(tca.DEFAULT_METHOD, model=model, tokenizer=tok)
inputs = tok(passkey_prompt(tok, 4096).text, return_tensors="pt")  # a needle in 4K tokens of essays

with tca.enable(model, method) as session:  # reversible: leaving restores the model
    out = session.generate(**inputs, max_new_tokens=12, do_sample=False)

print("answer:", tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True))
cache = session.cache  # the ragged per-head KV cache generate() used
print(f"KV held {cache.kv_bytes() / 2**20:.1f} MiB of {cache.dense_kv_bytes() / 2**20:.1f} MiB dense")
print("report:", session.prefill_report())
