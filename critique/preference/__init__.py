"""How an AI preference is asked and read: the A/B comparison and rating prompts, one `score`
call per chunk with both orders, and the pure label math. A library below the stages: `label`
and `evaluate` (its judge) both use it; it imports neither."""
