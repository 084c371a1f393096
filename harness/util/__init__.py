"""Small helpers every stage uses: staged atomic directories (fsutil), safe names and
secret scrubbing (security)."""
