"""The promotion report: aggregate records, check the route's gate, render the verdict."""
