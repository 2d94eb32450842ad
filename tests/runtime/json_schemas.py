"""Twenty varied JSON schemas for the structured-output tests: nested objects, arrays with
bounds, enums, numbers with ranges, string patterns and lengths, optional fields.

Each entry: (what to ask the model for, the schema). Strings and arrays are bounded so a
greedy small model always reaches the end of the object within the token budget.
"""

from __future__ import annotations

from typing import Any

NAME = {"type": "string", "minLength": 1, "maxLength": 20}

SCHEMAS: list[tuple[str, dict[str, Any]]] = [
    (
        "a person with a name and an age",
        {
            "type": "object",
            "properties": {"name": NAME, "age": {"type": "integer", "minimum": 0, "maximum": 120}},
            "required": ["name", "age"],
            "additionalProperties": False,
        },
    ),
    (
        "a city and its country",
        {
            "type": "object",
            "properties": {"city": NAME, "country": NAME},
            "required": ["city", "country"],
        },
    ),
    (
        "a traffic light state",
        {
            "type": "object",
            "properties": {"color": {"enum": ["red", "yellow", "green"]}},
            "required": ["color"],
        },
    ),
    (
        "a list of two to four fruits",
        {
            "type": "object",
            "properties": {
                "fruits": {"type": "array", "items": NAME, "minItems": 2, "maxItems": 4}
            },
            "required": ["fruits"],
        },
    ),
    (
        "a temperature reading in Celsius",
        {
            "type": "object",
            "properties": {"celsius": {"type": "number", "minimum": -50, "maximum": 60}},
            "required": ["celsius"],
        },
    ),
    (
        "a US zip code",
        {
            "type": "object",
            "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}},
            "required": ["zip"],
        },
    ),
    (
        "a book with a title and an author with a first and a last name",
        {
            "type": "object",
            "properties": {
                "title": NAME,
                "author": {
                    "type": "object",
                    "properties": {"first": NAME, "last": NAME},
                    "required": ["first", "last"],
                    "additionalProperties": False,
                },
            },
            "required": ["title", "author"],
        },
    ),
    (
        "a yes or no answer to: is the sky blue?",
        {"type": "object", "properties": {"answer": {"type": "boolean"}}, "required": ["answer"]},
    ),
    (
        "a product with a name, a price between 0 and 1000 and an optional discount",
        {
            "type": "object",
            "properties": {
                "name": NAME,
                "price": {"type": "number", "minimum": 0, "maximum": 1000},
                "discount": {"type": "integer", "minimum": 0, "maximum": 90},
            },
            "required": ["name", "price"],
        },
    ),
    (
        "three points with x and y coordinates from 0 to 9",
        {
            "type": "object",
            "properties": {
                "points": {
                    "type": "array",
                    "minItems": 3,
                    "maxItems": 3,
                    "items": {
                        "type": "object",
                        "properties": {
                            "x": {"type": "integer", "minimum": 0, "maximum": 9},
                            "y": {"type": "integer", "minimum": 0, "maximum": 9},
                        },
                        "required": ["x", "y"],
                        "additionalProperties": False,
                    },
                }
            },
            "required": ["points"],
        },
    ),
    (
        "a date written as YYYY-MM-DD",
        {
            "type": "object",
            "properties": {"date": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
            "required": ["date"],
        },
    ),
    (
        "an HTTP response with a status code and a short message",
        {
            "type": "object",
            "properties": {
                "status": {"type": "integer", "enum": [200, 201, 400, 404, 500]},
                "message": {"type": "string", "maxLength": 30},
            },
            "required": ["status", "message"],
        },
    ),
    (
        "a list of up to three integer scores from 1 to 10",
        {
            "type": "array",
            "items": {"type": "integer", "minimum": 1, "maximum": 10},
            "minItems": 1,
            "maxItems": 3,
        },
    ),
    (
        "a user with a username of lowercase letters and an optional email",
        {
            "type": "object",
            "properties": {
                "username": {"type": "string", "pattern": "^[a-z]{3,12}$"},
                "email": {"type": "string", "pattern": "^[a-z]{1,10}@[a-z]{1,10}\\.com$"},
            },
            "required": ["username"],
        },
    ),
    (
        "a recipe with a name and two to three ingredients, each with a name and grams",
        {
            "type": "object",
            "properties": {
                "name": NAME,
                "ingredients": {
                    "type": "array",
                    "minItems": 2,
                    "maxItems": 3,
                    "items": {
                        "type": "object",
                        "properties": {
                            "item": NAME,
                            "grams": {"type": "integer", "minimum": 1, "maximum": 1000},
                        },
                        "required": ["item", "grams"],
                    },
                },
            },
            "required": ["name", "ingredients"],
        },
    ),
    (
        "a color as a hex code like #a1b2c3",
        {
            "type": "object",
            "properties": {"hex": {"type": "string", "pattern": "^#[0-9a-f]{6}$"}},
            "required": ["hex"],
        },
    ),
    (
        "a planet and whether it has rings",
        {
            "type": "object",
            "properties": {
                "planet": {"enum": ["Mercury", "Venus", "Earth", "Mars", "Jupiter", "Saturn"]},
                "rings": {"type": "boolean"},
            },
            "required": ["planet", "rings"],
            "additionalProperties": False,
        },
    ),
    (
        "a rating between 0.0 and 5.0 with a short reason",
        {
            "type": "object",
            "properties": {
                "rating": {"type": "number", "minimum": 0, "maximum": 5},
                "reason": {"type": "string", "minLength": 1, "maxLength": 40},
            },
            "required": ["rating", "reason"],
        },
    ),
    (
        "a meeting with a day of the week and a list of one or two attendees",
        {
            "type": "object",
            "properties": {
                "day": {"enum": ["Mon", "Tue", "Wed", "Thu", "Fri"]},
                "attendees": {"type": "array", "items": NAME, "minItems": 1, "maxItems": 2},
                "room": {
                    "anyOf": [{"type": "integer", "minimum": 1, "maximum": 99}, {"type": "null"}]
                },
            },
            "required": ["day", "attendees", "room"],
        },
    ),
    (
        "a server config with a host, a port from 1024 to 65535 and an optional nested tls block",
        {
            "type": "object",
            "properties": {
                "host": {"type": "string", "pattern": "^[a-z]{1,10}(\\.[a-z]{1,10}){0,2}$"},
                "port": {"type": "integer", "minimum": 1024, "maximum": 65535},
                "tls": {
                    "type": "object",
                    "properties": {"enabled": {"type": "boolean"}, "cert": NAME},
                    "required": ["enabled"],
                },
            },
            "required": ["host", "port"],
            "additionalProperties": False,
        },
    ),
]
