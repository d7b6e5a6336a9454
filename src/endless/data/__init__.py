"""Texts and data sets that come from package registries (ASSETS.md), extracted once and cached."""
