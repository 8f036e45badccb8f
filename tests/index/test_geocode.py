import numpy as np
import pytest

from index.geocode import Place, ReverseGeocoder

PARIS = (48.8566, 2.3522)
MID_ATLANTIC = (30.0, -40.0)
TOKYO = (35.6762, 139.6503)


@pytest.fixture(scope="module")
def geocoder():
    return ReverseGeocoder()


def test_lookup_cities_and_sea(geocoder):
    paris, sea, tokyo = geocoder.lookup(np.array([PARIS, MID_ATLANTIC, TOKYO]))
    assert paris.country_code == "FR"
    assert paris.country == "France"
    assert paris.admin1 == "Île-de-France"
    assert paris.city == "Paris"
    assert paris.city_distance_km is not None and paris.city_distance_km < 5
    assert sea == Place(None, None, None, None, None)
    assert tokyo.country_code == "JP"
    assert tokyo.admin1 == "Tokyo"


def test_far_from_towns_on_land_keeps_country(geocoder):
    # Central Sahara: no city within 200 km, but on land, so it keeps a country.
    (place,) = geocoder.lookup([(23.0, 12.0)])
    assert place.country_code is not None
    assert place.city_distance_km > 200


def test_sea_threshold_is_configurable():
    # Near the coast of Brittany but at sea: within 200 km of a town, so it gets one.
    near_coast = (48.0, -5.5)
    assert ReverseGeocoder().lookup([near_coast])[0].country_code == "FR"
    assert ReverseGeocoder(sea_km=1.0).lookup([near_coast])[0].country_code is None


def test_country_codes(geocoder):
    codes = geocoder.country_codes(np.array([PARIS, MID_ATLANTIC, TOKYO]))
    assert codes.dtype == np.dtype("<U2")
    assert codes.tolist() == ["FR", "", "JP"]
    assert geocoder.country_codes(np.zeros((0, 2))).shape == (0,)
    assert geocoder.lookup(np.zeros((0, 2))) == []
