"""One Python file per recipe; each defines `config() -> recipes.config.Config`."""
