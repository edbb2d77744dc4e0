"""Reading routing logs (``routing_log``), routing statistics and figures (``routing_stats``,
``routing_plots``) and the results tables (``tables``)."""
