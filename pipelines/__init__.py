"""dsaforge.pipelines."""
