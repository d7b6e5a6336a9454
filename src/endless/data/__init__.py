"""Texts and data sets that come from package registries (docs/methods.md section 5), extracted once and cached."""
