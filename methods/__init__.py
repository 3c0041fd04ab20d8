"""Built-in methods; importing this package registers them (cilbench looks them up by name)."""
from methods import care, finetune, joint, simplecil  # noqa: F401
