"""Model commands: `bnnc info` (and `bnnc zoo`, registered from compiler.zoo's CLI module)."""
