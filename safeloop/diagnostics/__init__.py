"""Diagnostics: measurements that locate why training goes wrong."""
