"""How each simulated provider spells the model's participants.

The synthetic :class:`~feed.simulator.market_model.MarketModel` names teams
and players the way Betfair does ("Man Utd", "Wolves", "Dortmund", "LA
Lakers", tennis surnames). Real providers spell the same participants their
own way, and cross-provider event matching (:mod:`feed.matching`) has to
cope; so each simulator serves its provider's spelling:

- The Odds API (``theoddsapi``): full official names ("Manchester United",
  "Brighton and Hove Albion", "Wolverhampton Wanderers", "FSV Mainz 05",
  "Inter Milan", "Atlético Madrid" with its accent, "Los Angeles Lakers"),
  tennis players with first names ("Novak Djokovic", "Alex de Minaur");
- Pinnacle (``pinnacle``): full names too, with the German club forms
  ("Bayer 04 Leverkusen", "1. FSV Mainz 05", "1. FC Union Berlin"), no
  accents ("Atletico Madrid"), "Internazionale", "Atalanta";
- the push provider (``push``): short feed names, mostly the model's, a few
  its own ("Man United", "Atl. Madrid", "Bayern München", "Mainz 05"),
  tennis players as "Surname F." ("Djokovic N.").

A name no table lists is served as the model has it. Only participants are
renamed: "The Draw", "Over 2.5 Goals", racing runners and venues are not.

:func:`provider_name` renames one participant; :func:`provider_event_name`
an event name ("Home v Away", US-style "Away @ Home").
"""

from __future__ import annotations

__all__ = ["PROVIDERS", "provider_event_name", "provider_name"]

PINNACLE, TOA, PUSH = "pinnacle", "theoddsapi", "push"
PROVIDERS = (PINNACLE, TOA, PUSH)

#: tennis players' first names (the model has surnames, as Betfair shows them)
_FIRST = {"Djokovic": "Novak", "Alcaraz": "Carlos", "Sinner": "Jannik", "Medvedev": "Daniil", "Zverev": "Alexander",
          "Rublev": "Andrey", "Ruud": "Casper", "Fritz": "Taylor", "De Minaur": "Alex", "Tsitsipas": "Stefanos",
          "Hurkacz": "Hubert", "Rune": "Holger", "Swiatek": "Iga", "Sabalenka": "Aryna", "Gauff": "Coco",
          "Rybakina": "Elena", "Pegula": "Jessica", "Jabeur": "Ons", "Ostapenko": "Jelena", "Zheng": "Qinwen"}
#: surnames written otherwise after a first name ("Alex de Minaur")
_SURNAME_AFTER_FIRST = {"De Minaur": "de Minaur"}

#: model (Betfair) soccer name -> The Odds API name
_TOA_SOCCER = {
    "Man City": "Manchester City", "Man Utd": "Manchester United", "Tottenham": "Tottenham Hotspur",
    "Newcastle": "Newcastle United", "West Ham": "West Ham United", "Brighton": "Brighton and Hove Albion",
    "Wolves": "Wolverhampton Wanderers", "Leeds": "Leeds United",
    "Atletico Madrid": "Atlético Madrid",
    "Dortmund": "Borussia Dortmund", "Leverkusen": "Bayer Leverkusen", "Frankfurt": "Eintracht Frankfurt",
    "Wolfsburg": "VfL Wolfsburg", "Freiburg": "SC Freiburg", "Stuttgart": "VfB Stuttgart", "Mainz": "FSV Mainz 05",
    "Inter": "Inter Milan", "Roma": "AS Roma", "Atalanta": "Atalanta BC",
}
#: model (Betfair) soccer name -> Pinnacle name
_PN_SOCCER = {
    "Man City": "Manchester City", "Man Utd": "Manchester United", "Tottenham": "Tottenham Hotspur",
    "Newcastle": "Newcastle United", "West Ham": "West Ham United", "Brighton": "Brighton and Hove Albion",
    "Wolves": "Wolverhampton Wanderers", "Leeds": "Leeds United",
    "Dortmund": "Borussia Dortmund", "Leverkusen": "Bayer 04 Leverkusen", "Frankfurt": "Eintracht Frankfurt",
    "Wolfsburg": "VfL Wolfsburg", "Freiburg": "SC Freiburg", "Stuttgart": "VfB Stuttgart",
    "Union Berlin": "1. FC Union Berlin", "Mainz": "1. FSV Mainz 05",
    "Inter": "Internazionale", "Roma": "AS Roma",
}
#: model (Betfair) soccer name -> the push provider's name
_PUSH_SOCCER = {"Man Utd": "Man United", "Atletico Madrid": "Atl. Madrid", "Bayern Munich": "Bayern München",
                "Mainz": "Mainz 05"}
#: model (Betfair) NBA name -> full name (The Odds API and Pinnacle)
_NBA_FULL = {"LA Lakers": "Los Angeles Lakers"}

_SOCCER, _TENNIS, _BASKETBALL = "1", "2", "7522"


def provider_name(provider: str, sport: str, name: str) -> str:
    """``name`` (a participant as the model has it) as ``provider`` spells it;
    ``sport``: the model's eventTypeId ("1" soccer, "2" tennis, "7522"
    basketball; other sports keep the model's names)."""
    if sport == _SOCCER:
        table = {TOA: _TOA_SOCCER, PINNACLE: _PN_SOCCER, PUSH: _PUSH_SOCCER}.get(provider, {})
        return table.get(name, name)
    if sport == _BASKETBALL:
        return _NBA_FULL.get(name, name) if provider in (TOA, PINNACLE) else name
    if sport == _TENNIS:
        first = _FIRST.get(name)
        if first is None:
            return name
        if provider in (TOA, PINNACLE):
            return f"{first} {_SURNAME_AFTER_FIRST.get(name, name)}"
        if provider == PUSH:
            return f"{name} {first[0]}."
    return name


def provider_event_name(provider: str, sport: str, event_name: str) -> str:
    """An event name ("Home v Away"; basketball "Away @ Home") with both
    participants as ``provider`` spells them; other names unchanged."""
    for sep in (" v ", " @ "):
        if sep in event_name:
            a, b = event_name.split(sep, 1)
            return f"{provider_name(provider, sport, a)}{sep}{provider_name(provider, sport, b)}"
    return event_name
