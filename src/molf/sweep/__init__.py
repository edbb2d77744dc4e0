"""molf.sweep"""
