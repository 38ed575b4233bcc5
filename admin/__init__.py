"""The pochta command line: admin verbs and process supervision."""
