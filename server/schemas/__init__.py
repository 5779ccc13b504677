"""Request and response bodies, one module per API: `native` (/generate, /prefixes, /jobs, /usage,
/admin, /server), `openai` (/v1/completions, /v1/models), `tokenize` (/tokenize, /detokenize,
/tokenizer_info)."""
