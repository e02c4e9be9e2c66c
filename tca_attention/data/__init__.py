"""Offline long texts and small prompt builders."""
