"""HTTP routers (one per resource) and the error shape they share."""
