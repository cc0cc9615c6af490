"""The runtime beneath rung's jobs: process settings that make CPU boxes and GPU clusters behave."""
