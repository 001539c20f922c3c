"""Applications built on the library: the end-to-end demo (``rsvheat demo``) and the efficiency benchmark
(``rsvheat bench``). Nothing in the library imports them."""
