# Intentionally empty: transformers probes `import kernels` (a Hugging Face package of the same name)
# when its Mistral code is imported, and with the project root on sys.path it finds this folder.
# Importing it must therefore do nothing: import `kernels.attention` / `kernels.logprobs` explicitly.
