"""The `knowlens` command. Thin: every verb imports torch and the library only when it runs."""
