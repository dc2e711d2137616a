# Before any mlx_lm import: a rank that holds no tokenizer never loads transformers (1.3 s).
from quantize.light_mlx_lm import install as _install

_install()
