"""Built-in methods; importing this package registers them (cilbench looks them up by name)."""
from methods import aper, care, coda_prompt, dualprompt, finetune, joint, l2p, rwf, samoe, simplecil  # noqa: F401
