"""Built-in recipes, one YAML file each (``modelpress recipes`` lists them)."""
