"""Model names and option values the command line needs without importing torch."""

DEFAULT_MODEL = "smollm2-135m"
NUMERICS = ("raw", "hooked")
NUMERICS_HELP = (
    "raw: Hugging Face numerics as the model ships; hooked: TransformerLens compatibility mode "
    "(LayerNorm folded, writing weights centred), the activations HookedTransformer gave and "
    "SAEs trained with HookedTransformer/SAELens saw"
)
